"""Per-example classification losses: cross-entropy and AACE.

All losses take integer labels, return one value per example (the caller
averages) and compute internally in at least float32, returning the dtype of
the logits.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from aace_jax import _checks

AACE_MODES = ("ada", "const", "rand")


def _check_logits_and_labels(owner: str, logits, labels) -> tuple[jax.Array, jax.Array]:
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"{owner}: logits must be floating point, got dtype {logits.dtype}.")
  if logits.ndim < 1 or logits.shape[-1] < 2:
    raise ValueError(f"{owner}: logits need a class axis of at least 2 classes, got shape {logits.shape}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{owner}: labels must be integer class indices, got dtype {labels.dtype}.")
  if labels.shape != logits.shape[:-1]:
    raise ValueError(
      f"{owner}: labels of shape {labels.shape} do not match logits of shape"
      f" {logits.shape}; expected labels of shape {logits.shape[:-1]}."
    )
  return logits, labels


def _compute_dtype(dtype) -> jnp.dtype:
  # Low-precision logits are handled in float32: `1 - p_y` and the softmax over
  # the other classes underflow in bfloat16/float16 for confident predictions.
  return jnp.promote_types(dtype, jnp.float32)


def _one_hot_or_nan(labels: jax.Array, num_classes: int, dtype) -> jax.Array:
  """One-hot rows; rows of out-of-range labels are NaN so the error shows."""
  valid = (labels >= 0) & (labels < num_classes)
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=dtype)
  return jnp.where(valid[..., None], one_hot, jnp.nan)


def _soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """`-sum_i t_i log softmax(logits)_i`, with `0 * log 0` taken as 0."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.where(targets == 0, 0, targets * log_probs), axis=-1)


def cross_entropy(logits, labels, *, label_smoothing: float = 0.0) -> jax.Array:
  r"""Per-example softmax cross-entropy with integer labels.

  With smoothing :math:`s` and :math:`C` classes the target puts :math:`1 - s`
  on the true class and :math:`s / (C - 1)` on each other class, as the
  AACE-SAM authors' ``smooth_crossentropy`` does (not optax's :math:`s / C`):

  .. math::
    \ell(z, y) = -\sum_i t_i \log \mathrm{softmax}(z)_i .

  Args:
    logits: unnormalized scores, shape ``[..., C]``, floating point, ``C >= 2``.
    labels: integer class indices, shape ``[...]``. A label outside
      ``[0, C)`` cannot raise inside ``jax.jit``: its loss and gradient are
      NaN, so the mistake shows. Use :func:`check_labels` on the host to
      catch it with a message.
    label_smoothing: :math:`s` in ``[0, 1]``.

  Returns:
    The loss of each example, shape ``logits.shape[:-1]``, dtype of ``logits``.

  Example:
    >>> import jax.numpy as jnp
    >>> from aace_jax import cross_entropy
    >>> logits = jnp.array([[0.0, 0.0], [2.0, 0.0]])
    >>> print(cross_entropy(logits, jnp.array([0, 0])).round(4))
    [0.6931 0.1269]

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  logits, labels = _check_logits_and_labels("cross_entropy", logits, labels)
  _checks.check_in_range("cross_entropy", "label_smoothing", label_smoothing, 0.0, 1.0)
  num_classes = logits.shape[-1]
  dtype = _compute_dtype(logits.dtype)
  one_hot = _one_hot_or_nan(labels, num_classes, dtype)
  targets = one_hot * (1 - label_smoothing) + (1 - one_hot) * (label_smoothing / (num_classes - 1))
  return _soft_cross_entropy(logits.astype(dtype), targets).astype(logits.dtype)


def aace_targets(
  logits,
  labels,
  *,
  threshold: float = 0.0,
  mode: str = "ada",
  key: Optional[jax.Array] = None,
) -> jax.Array:
  r"""Adaptive adversarial soft targets :math:`q` of AACE (gradient stopped).

  With :math:`p = \mathrm{softmax}(z)` held constant and true class :math:`y`:

  .. math::
    q_y = \min(p_y, \theta), \qquad
    q_j = \frac{a_j}{\sum_{k \ne y} a_k} \quad (j \ne y),

  where :math:`a_j = p_j` (``"ada"``), :math:`1` (``"const"``) or
  :math:`u_j \sim U(0, 1]` (``"rand"``). The other classes are normalized to 1
  on their own, so for :math:`\theta > 0` the target sums to :math:`1 + q_y`,
  exactly as in the authors' code. In ``"ada"`` mode :math:`q_{j \ne y}` is
  the softmax of the logits with the true class removed, which stays exact
  when :math:`1 - p_y` underflows.

  Args:
    logits: unnormalized scores, shape ``[..., C]``, floating point, ``C >= 2``.
    labels: integer class indices, shape ``[...]``. Rows of labels outside
      ``[0, C)`` are NaN (see :func:`check_labels`).
    threshold: :math:`\theta` in ``[0, 1]``; 0 (the paper's setting) puts no
      mass on the true class.
    mode: ``"ada"``, ``"const"`` or ``"rand"``.
    key: a PRNG key, required by ``"rand"`` and ignored by the other modes.

  Returns:
    :math:`q`, shape ``logits.shape``, in at least float32.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from aace_jax import aace_targets
    >>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    >>> print(np.asarray(aace_targets(logits, jnp.array([0])), float).round(4))
    [[0.  0.6 0.4]]

  References:
    Ratchatorn and Tanaka, `Adaptive Adversarial Cross-Entropy Loss for
    Sharpness-Aware Minimization <https://arxiv.org/abs/2406.14329>`_,
    ICIP 2024.
  """
  logits, labels = _check_logits_and_labels("aace_targets", logits, labels)
  return _adversarial_targets("aace_targets", logits, labels, threshold, mode, key)


def _adversarial_targets(owner, logits, labels, threshold, mode, key) -> jax.Array:
  _checks.check_in_range(owner, "threshold", threshold, 0.0, 1.0)
  if mode not in AACE_MODES:
    raise _checks.bad_argument(ValueError, owner, "mode", f"mode must be one of {AACE_MODES}, got {mode!r}.")
  if mode == "rand" and key is None:
    raise _checks.bad_argument(ValueError, owner, "key", "mode='rand' draws the targets at random and needs key=.")

  num_classes = logits.shape[-1]
  dtype = _compute_dtype(logits.dtype)
  logits = jax.lax.stop_gradient(logits.astype(dtype))
  one_hot = _one_hot_or_nan(labels, num_classes, dtype)
  others = 1 - one_hot
  if mode == "ada":
    other_targets = jax.nn.softmax(jnp.where(one_hot == 1, -jnp.inf, logits), axis=-1)
  elif mode == "const":
    other_targets = others / (num_classes - 1)
  else:
    # 1 - U[0, 1) is U(0, 1]: no other class gets zero weight.
    weights = (1 - jax.random.uniform(key, logits.shape, dtype)) * others
    other_targets = weights / jnp.sum(weights, axis=-1, keepdims=True)
  true_prob = jnp.sum(jax.nn.softmax(logits, axis=-1) * one_hot, axis=-1, keepdims=True)
  targets = jnp.minimum(true_prob, threshold) * one_hot + other_targets * others
  return jax.lax.stop_gradient(targets)


def aace_cross_entropy(
  logits,
  labels,
  *,
  threshold: float = 0.0,
  mode: str = "ada",
  key: Optional[jax.Array] = None,
) -> jax.Array:
  r"""Per-example adaptive adversarial cross-entropy (AACE) loss.

  The cross-entropy of the model against the adversarial targets :math:`q` of
  :func:`aace_targets`:

  .. math::
    \ell(z, y) = -\sum_i q_i \log \mathrm{softmax}(z)_i, \qquad
    \nabla_z \ell = \Big(\sum_i q_i\Big) p - q .

  For ``threshold=0`` the gradient is :math:`p - q`; its norm lies between
  :math:`p_y` and :math:`\sqrt{2}\, p_y` in ``"ada"`` mode, so it grows as the
  model becomes confident, where the cross-entropy gradient vanishes. The
  authors log :math:`\mathrm{KL}(q \| p) = \ell - H(q)` instead, which has the
  same gradient; for ``threshold=0`` and ``"ada"`` it is
  :math:`-\log(1 - p_y)`.

  Args:
    logits: unnormalized scores, shape ``[..., C]``, floating point, ``C >= 2``.
    labels: integer class indices, shape ``[...]``. A label outside
      ``[0, C)`` gives a NaN loss and gradient (see :func:`check_labels`).
    threshold: :math:`\theta` in ``[0, 1]``, see :func:`aace_targets`.
    mode: ``"ada"`` (default), ``"const"`` or ``"rand"``.
    key: a PRNG key, required by ``"rand"``.

  Returns:
    The loss of each example, shape ``logits.shape[:-1]``, dtype of ``logits``.

  Example:
    >>> import jax.numpy as jnp
    >>> from aace_jax import aace_cross_entropy
    >>> logits = jnp.log(jnp.array([[0.9, 0.1]]))  # two classes: q = [0, 1]
    >>> print(aace_cross_entropy(logits, jnp.array([0])).round(4))  # -log(0.1)
    [2.3026]

  References:
    Ratchatorn and Tanaka, `Adaptive Adversarial Cross-Entropy Loss for
    Sharpness-Aware Minimization <https://arxiv.org/abs/2406.14329>`_,
    ICIP 2024.
  """
  logits, labels = _check_logits_and_labels("aace_cross_entropy", logits, labels)
  targets = _adversarial_targets("aace_cross_entropy", logits, labels, threshold, mode, key)
  dtype = _compute_dtype(logits.dtype)
  return _soft_cross_entropy(logits.astype(dtype), targets).astype(logits.dtype)


def aace_kl_divergence(
  logits,
  labels,
  *,
  threshold: float = 0.0,
  mode: str = "ada",
  key: Optional[jax.Array] = None,
) -> jax.Array:
  r"""Per-example :math:`\mathrm{KL}(q \| p)`: the AACE value the authors compute and log.

  With the adversarial targets :math:`q` of :func:`aace_targets` (same
  arguments, same numerics) and :math:`p = \mathrm{softmax}(z)`:

  .. math::
    \mathrm{KL}(q \| p) = \sum_i q_i (\log q_i - \log p_i)
    = \ell_{\mathrm{AACE}} - H(q),

  with :math:`0 \log 0 = 0`. It differs from :func:`aace_cross_entropy` by the
  entropy of :math:`q`, which is constant under the stopped gradient: both
  losses have the same gradient, and the perturbation does not depend on
  which one is used. For ``threshold=0`` and ``"ada"`` it is
  :math:`-\log(1 - p_y)`, computed as a log-sum-exp over the other classes
  so that it stays finite when :math:`1 - p_y` underflows.

  Args:
    logits: unnormalized scores, shape ``[..., C]``, floating point, ``C >= 2``.
    labels: integer class indices, shape ``[...]``. A label outside
      ``[0, C)`` gives NaN (see :func:`check_labels`).
    threshold: :math:`\theta` in ``[0, 1]``, see :func:`aace_targets`.
    mode: ``"ada"`` (default), ``"const"`` or ``"rand"``.
    key: a PRNG key, required by ``"rand"``.

  Returns:
    The divergence of each example, shape ``logits.shape[:-1]``, dtype of ``logits``.

  Example:
    >>> import jax.numpy as jnp
    >>> from aace_jax import aace_kl_divergence
    >>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    >>> print(aace_kl_divergence(logits, jnp.array([0])).round(4))  # -log(1 - 0.5)
    [0.6931]

  References:
    Ratchatorn and Tanaka, `Adaptive Adversarial Cross-Entropy Loss for
    Sharpness-Aware Minimization <https://arxiv.org/abs/2406.14329>`_,
    ICIP 2024.
  """
  logits, labels = _check_logits_and_labels("aace_kl_divergence", logits, labels)
  targets = _adversarial_targets("aace_kl_divergence", logits, labels, threshold, mode, key)
  dtype = _compute_dtype(logits.dtype)
  logits = logits.astype(dtype)
  if mode == "ada":
    # log q_j = z_j - logsumexp_{k != y} z_k exactly, where q_j itself may underflow.
    one_hot = _one_hot_or_nan(labels, logits.shape[-1], dtype)
    log_targets = jax.nn.log_softmax(jnp.where(one_hot == 1, -jnp.inf, logits), axis=-1)
    log_targets = jnp.where(one_hot == 1, jnp.log(targets), log_targets)
  else:
    log_targets = jnp.log(targets)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  terms = jnp.where(targets == 0, 0, targets * (jax.lax.stop_gradient(log_targets) - log_probs))
  return jnp.sum(terms, axis=-1).astype(logits.dtype)


def check_labels(labels, num_classes: int) -> None:
  """Checks on the host that every label is a class index in `[0, num_classes)`.

  Inside ``jax.jit`` a bad label cannot raise (the losses make it NaN instead),
  so call this where the data is read.

  Args:
    labels: integer labels, any shape, on the host or a device.
    num_classes: the number of classes, at least 2.

  Raises:
    ValueError: naming the first bad label, its index and how many are bad.
    TypeError: if the labels are not integers.

  Example:
    >>> import numpy as np
    >>> from aace_jax import check_labels
    >>> check_labels(np.array([0, 2, 1]), num_classes=3)
    >>> check_labels(np.array([0, 3]), num_classes=3)
    Traceback (most recent call last):
    ...
    ValueError: labels[1] = 3 is outside [0, 3) (1 of 2 labels out of range).
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
    raise TypeError(f"check_labels: num_classes must be an int, got {num_classes!r}.")
  if num_classes < 2:
    raise ValueError(f"check_labels: num_classes must be at least 2, got {num_classes}.")
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"check_labels: labels must be integers, got dtype {labels.dtype}.")
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    where = index[0] if len(index) == 1 else index
    raise ValueError(
      f"labels[{where}] = {labels[index]} is outside [0, {num_classes})"
      f" ({int(bad.sum())} of {labels.size} labels out of range)."
    )
