"""Paired statistics of two methods run on the same seeds: what `train/compare.py` reports for each pair.

Runs of one seed share their initialization, data order, subset, noisy
labels and augmentation draws, so the question is about the per-seed
differences ``d_i = method_i - baseline_i``; every number here is computed
by `scipy.stats` from them:

- the mean difference and its 95% t-interval (`scipy.stats.ttest_rel`);
- a 95% bootstrap interval of the mean (`scipy.stats.bootstrap`, BCa, a
  fixed generator so the report is reproducible);
- the p-value of the exact paired sign-flip test
  (`scipy.stats.permutation_test` over all ``2**n`` sign patterns of ``d``,
  two-sided): with ``n`` seeds it cannot go below ``2 / 2**n``;
- how many seeds the method wins (``d_i > 0``) and ties.

A difference is *established* when its t-interval leaves out 0 and its
sign-flip p-value is below 0.05: with identical differences over three
seeds the t-interval is a point, but three seeds cannot rule out chance.
"""

import warnings
from typing import NamedTuple

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999


class PairedComparison(NamedTuple):
  """A method against a baseline over the seeds both ran, in the units of the values compared.

  Attributes:
    seeds: the number of paired seeds ``n``.
    mean_difference: the mean of ``method - baseline`` over the seeds.
    t_interval: its `CONFIDENCE` t-interval ``(low, high)``.
    bootstrap_interval: its `CONFIDENCE` BCa bootstrap interval.
    p_value: two-sided, of the exact sign-flip test of a zero mean difference.
    smallest_p_value: ``2 / 2**n``, the smallest `p_value` that ``n`` seeds allow.
    wins, ties: seeds where the method is above, and equal to, the baseline.
    established: whether `t_interval` leaves out 0 and `p_value` is below 0.05.
  """

  seeds: int
  mean_difference: float
  t_interval: tuple[float, float]
  bootstrap_interval: tuple[float, float]
  p_value: float
  smallest_p_value: float
  wins: int
  ties: int
  established: bool


def _mean(values, axis=-1):
  return np.mean(values, axis=axis)


def compare(method, baseline) -> PairedComparison:
  """The paired statistics of `method` against `baseline`, two arrays of per-seed values in seed order.

  Args:
    method, baseline: one value per seed (the same seeds, in the same order), at least two seeds.

  Returns:
    A `PairedComparison`.

  >>> result = compare([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
  >>> round(result.mean_difference, 6), result.p_value, result.wins
  (2.0, 0.25, 3)
  """
  method, baseline = np.asarray(method, np.float64), np.asarray(baseline, np.float64)
  if method.shape != baseline.shape or method.ndim != 1:
    raise ValueError(f"paired values need two 1-D arrays of one shape, got {method.shape} and {baseline.shape}")
  if len(method) < 2:
    raise ValueError(f"a paired comparison needs at least 2 seeds, got {len(method)}")
  if not (np.isfinite(method).all() and np.isfinite(baseline).all()):
    raise ValueError("a paired comparison needs finite values")
  differences = method - baseline
  mean = float(differences.mean())
  constant = bool(np.all(differences == differences[0]))
  with warnings.catch_warnings():
    # Identical differences: scipy warns of the zero spread, and its interval is the point itself.
    warnings.simplefilter("ignore", RuntimeWarning)
    t_interval = stats.ttest_rel(method, baseline).confidence_interval(CONFIDENCE)
  if constant:  # every resample is the same mean: BCa's acceleration is 0/0
    bootstrap_interval = (mean, mean)
  else:
    bootstrap = stats.bootstrap(
      (differences,),
      _mean,
      confidence_level=CONFIDENCE,
      n_resamples=BOOTSTRAP_RESAMPLES,
      method="BCa",
      rng=np.random.default_rng(0),
    )
    bootstrap_interval = (float(bootstrap.confidence_interval.low), float(bootstrap.confidence_interval.high))
  sign_flip = stats.permutation_test(
    (differences,), _mean, permutation_type="samples", n_resamples=np.inf, alternative="two-sided"
  )
  low, high = float(t_interval.low), float(t_interval.high)
  return PairedComparison(
    seeds=len(differences),
    mean_difference=mean,
    t_interval=(low, high),
    bootstrap_interval=bootstrap_interval,
    p_value=float(sign_flip.pvalue),
    smallest_p_value=2.0 / 2 ** len(differences),
    wins=int((differences > 0).sum()),
    ties=int((differences == 0).sum()),
    established=bool((low > 0 or high < 0) and sign_flip.pvalue < 0.05),
  )
