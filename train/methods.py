"""The method of a run: its optax transformation, its two losses and what every run logs of AACE.

`create_training_method(config, steps_per_epoch)` is the one place that turns
the config's method fields into library objects, so the library's own
argument checks (rho, the AACE mode and threshold, label smoothing) are the
only ones: `config_checks.checked_method` builds the method to run them.
"""

import functools
from typing import Callable
from typing import NamedTuple

import ml_collections
import numpy as np
import optax

import aace_jax

METHODS = ("sgd", "sam", "aace_sam", "asam")
DEFAULT_RHO = {"aace_sam": 0.2, "sam": 0.05, "asam": 0.5, "sgd": 0.0}


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """The authors' step schedule: lr x lr_decay at each milestone fraction of the epochs.

  Their loop sets the rate for epoch e after each step (`scheduler(epoch)`
  follows `optimizer.step()`), so a new rate takes effect from the second step
  of its first epoch; the boundaries below reproduce that exactly.
  """
  boundaries = {}
  for fraction in config.lr_milestones:
    first_epoch = int(np.ceil(fraction * config.num_epochs))
    boundaries[first_epoch * steps_per_epoch + 1] = config.lr_decay
  return optax.piecewise_constant_schedule(config.learning_rate, boundaries)


class TrainingMethod(NamedTuple):
  """What `aace_jax.make_train_step` needs to train with one of `METHODS`.

  Attributes:
    tx: the optax transformation: the base SGD (weight decay, momentum, the
      schedule, injected so the step reports the learning rate), wrapped in
      `aace_sam` or `sam` for the sharpness-aware methods.
    perturbation_loss: the per-example loss of the first pass (AACE for
      aace_sam and sgd, whose step only reports it; cross-entropy for sam and
      asam).
    loss: the per-example training loss: cross-entropy with the config's
      label smoothing.
    aace_metrics: what every run logs from its first pass, whatever its
      perturbation loss: ``aace_kl``, KL(q || p) as the authors log it, and
      ``aace_ce``, the cross-entropy against q that AACE-SAM differentiates.
  """

  tx: optax.GradientTransformation
  perturbation_loss: Callable
  loss: Callable
  aace_metrics: dict


def rho(config: ml_collections.ConfigDict) -> float:
  """The perturbation size of the run: `config.rho`, or `DEFAULT_RHO[config.method]` when it is None."""
  return DEFAULT_RHO[config.method] if config.rho is None else config.rho


def create_training_method(config: ml_collections.ConfigDict, steps_per_epoch: int) -> TrainingMethod:
  """The `TrainingMethod` of `config.method`; the library checks every argument it is given."""
  base = optax.chain(
    optax.add_decayed_weights(config.weight_decay),
    optax.inject_hyperparams(optax.sgd)(
      learning_rate=learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum
    ),
  )
  targets = {"threshold": config.aace_threshold, "mode": config.aace_mode}
  aace = functools.partial(aace_jax.aace_cross_entropy, **targets)
  aace_metrics = {"aace_kl": functools.partial(aace_jax.aace_kl_divergence, **targets), "aace_ce": aace}
  loss = functools.partial(aace_jax.cross_entropy, label_smoothing=config.label_smoothing)
  perturbation = {
    "max_perturbation_norm": config.max_perturbation_norm,
    "perturb_every": config.perturb_every,
    "reuse_perturbation": config.reuse_perturbation,
  }
  if config.normalize is not None:
    perturbation["normalize"] = config.normalize
  if config.method == "sgd":
    return TrainingMethod(base, aace, loss, aace_metrics)
  if config.method == "aace_sam":
    return TrainingMethod(aace_jax.aace_sam(base, rho(config), **perturbation), aace, loss, aace_metrics)
  adaptive = config.method == "asam"
  return TrainingMethod(aace_jax.sam(base, rho(config), adaptive=adaptive, **perturbation), loss, loss, aace_metrics)
