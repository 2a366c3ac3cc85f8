"""AACE-SAM and SAM as Optax gradient transformations.

Both are one mechanism: perturb the parameters along the gradient of a
perturbation loss, take the training-loss gradient there, and hand it to an
inner optimizer that updates the unperturbed parameters. They differ in the
loss the caller differentiates, the direction of the step and its scaling.
"""

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from aace_jax import _checks

GradFn = Callable[[optax.Params], optax.Updates]


class SAMState(NamedTuple):
  """State of :func:`aace_sam` and :func:`sam`.

  The two norms describe the last call of ``update`` and are there for
  logging, so a training loop need not recompute them. Both are float32
  scalars, zero before the first step. Read them from the state the update
  returned (inside ``optax.chain`` it is an element of the chain's tuple).

  Attributes:
    inner_state: the state of the wrapped optimizer.
    perturbation_grad_norm: the global L2 norm of the perturbation-loss
      gradient ``g`` (after averaging over ``batch_axis_name``), or of
      ``|w| * g`` when ``adaptive=True``, as the authors log ``grad_norm``.
    perturbation_norm: the global L2 norm of the perturbation
      ``w_adv - w``, the authors' ``ew_norm``.
  """

  inner_state: optax.OptState
  perturbation_grad_norm: jax.Array
  perturbation_norm: jax.Array


def _upcast(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def global_norm(tree) -> jax.Array:
  # Squares are summed in at least float32: bfloat16/float16 overflow or lose
  # the small terms of a large model's norm.
  squares = [jnp.sum(jnp.square(_upcast(x))) for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(squares))


def _sharpness_aware(
    owner: str,
    optimizer: optax.GradientTransformation,
    rho,
    *,
    ascent: bool,
    normalize: bool,
    adaptive: bool,
    eps,
    batch_axis_name: Optional[str],
) -> optax.GradientTransformationExtraArgs:
  """The one implementation behind `aace_sam` and `sam`."""
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
        f"{owner}: optimizer must be an optax.GradientTransformation, got {optimizer!r}."
    )
  _checks.check_in_range(owner, "rho", rho, 0.0, float("inf"))
  _checks.check_in_range(owner, "eps", eps, 0.0, float("inf"))
  for name, flag in (("normalize", normalize), ("adaptive", adaptive)):
    if not isinstance(flag, bool):
      raise TypeError(f"{owner}: {name} must be a bool, got {flag!r}.")
  inner = optax.with_extra_args_support(optimizer)
  sign = 1.0 if ascent else -1.0

  def init_fn(params: optax.Params) -> SAMState:
    return SAMState(
        inner_state=inner.init(params),
        perturbation_grad_norm=jnp.zeros([], jnp.float32),
        perturbation_norm=jnp.zeros([], jnp.float32),
    )

  def update_fn(
      updates: optax.Updates,
      state: SAMState,
      params: Optional[optax.Params] = None,
      *,
      grad_fn: Optional[GradFn] = None,
      **extra_args,
  ) -> tuple[optax.Updates, SAMState]:
    if grad_fn is None:
      raise TypeError(
          f"{owner}.update needs grad_fn=, a function mapping parameters to the"
          " gradients of the training loss; it is called at the perturbed parameters."
      )
    if params is None:
      raise ValueError(f"{owner}.update needs params: the perturbation is applied to them.")
    grads = updates
    if batch_axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name=batch_axis_name)
    if adaptive:
      # ASAM: the step is T^2 g / ||T g|| with T = |w|.
      grads = jax.tree.map(lambda g, w: g * jnp.abs(w).astype(g.dtype), grads, params)
    grad_norm = global_norm(grads)
    if adaptive:
      grads = jax.tree.map(lambda g, w: g * jnp.abs(w).astype(g.dtype), grads, params)
    scale = sign * rho
    if normalize:
      denominator = grad_norm + eps
      # A zero gradient gives a zero perturbation even with eps=0.
      scale = jnp.where(denominator > 0, scale / jnp.where(denominator > 0, denominator, 1), 0)
    perturbation = jax.tree.map(lambda g: scale * _upcast(g), grads)
    perturbation_norm = global_norm(perturbation)
    perturbed_params = jax.tree.map(
        lambda w, e: (w + e).astype(w.dtype), params, perturbation
    )
    del grads, perturbation
    perturbed_grads = grad_fn(perturbed_params)
    if batch_axis_name is not None:
      perturbed_grads = jax.lax.pmean(perturbed_grads, axis_name=batch_axis_name)
    updates, inner_state = inner.update(
        perturbed_grads, state.inner_state, params, **extra_args
    )
    return updates, SAMState(
        inner_state=inner_state,
        perturbation_grad_norm=grad_norm.astype(jnp.float32),
        perturbation_norm=perturbation_norm.astype(jnp.float32),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def aace_sam(
    optimizer: optax.GradientTransformation,
    rho: jax.typing.ArrayLike = 0.2,
    *,
    normalize: bool = False,
    adaptive: bool = False,
    eps: jax.typing.ArrayLike = 1e-12,
    batch_axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AACE-SAM: sharpness-aware minimization with an AACE perturbation.

  ``update`` receives :math:`g = \nabla_w L_{\mathrm{AACE}}(w)`, the gradient
  of the perturbation loss (:func:`aace_cross_entropy` averaged over the
  batch) at the current parameters, and descends it:

  .. math::
    w_{\mathrm{adv}} = w - \rho\, T^2 g \,/\, s, \qquad
    s = \begin{cases} \|T g\| + \epsilon & \text{normalize} \\
                      1 & \text{otherwise} \end{cases}

  with :math:`T = |w|` element-wise when ``adaptive`` (ASAM) and :math:`T = 1`
  otherwise. It then calls ``grad_fn(w_adv)`` for the training-loss gradient
  :math:`\nabla_w L_{\mathrm{CE}}(w_{\mathrm{adv}})` and returns
  ``optimizer``'s update for that gradient, taken at :math:`w` (weight decay
  in ``optimizer`` therefore acts on :math:`w`, not :math:`w_{adv}`).

  ``update(updates, state, params, *, grad_fn, **extra_args)``: ``grad_fn``
  maps parameters to gradients and is called once, at :math:`w_{adv}`; the
  other extra arguments go to ``optimizer``.

  Args:
    optimizer: the base optimizer, e.g. ``optax.chain(
      optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))``.
    rho: the perturbation size :math:`\rho \ge 0`; 0.2 in the paper.
    normalize: divide the step by :math:`\|T g\| + \epsilon` (the authors'
      ``use_grad_norm``; off in all their runs).
    adaptive: ASAM's element-wise scaling :math:`T = |w|`.
    eps: :math:`\epsilon \ge 0`, used when ``normalize``.
    batch_axis_name: a mapped axis (``jax.pmap``/``shard_map``) over which both
      gradients are averaged before use.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SAMState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from aace_jax import aace_sam, aace_cross_entropy, cross_entropy
    >>> x, y = jnp.array([[1.0, 2.0], [-1.0, 0.5]]), jnp.array([0, 1])
    >>> def loss(w, fn):
    ...   return fn(x @ w, y).mean()
    >>> w = jnp.zeros((2, 2))
    >>> tx = aace_sam(optax.sgd(0.1), rho=0.2)
    >>> state = tx.init(w)
    >>> grad_fn = jax.grad(lambda v: loss(v, cross_entropy))
    >>> for _ in range(3):
    ...   g = jax.grad(lambda v: loss(v, aace_cross_entropy))(w)
    ...   updates, state = tx.update(g, state, w, grad_fn=grad_fn)
    ...   w = optax.apply_updates(w, updates)
    >>> bool(loss(w, cross_entropy) < jnp.log(2.0))
    True

  References:
    Ratchatorn and Tanaka, `Adaptive Adversarial Cross-Entropy Loss for
    Sharpness-Aware Minimization <https://arxiv.org/abs/2406.14329>`_,
    ICIP 2024.

    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  return _sharpness_aware(
      "aace_sam",
      optimizer,
      rho,
      ascent=False,
      normalize=normalize,
      adaptive=adaptive,
      eps=eps,
      batch_axis_name=batch_axis_name,
  )


def sam(
    optimizer: optax.GradientTransformation,
    rho: jax.typing.ArrayLike = 0.05,
    *,
    normalize: bool = True,
    adaptive: bool = False,
    eps: jax.typing.ArrayLike = 1e-12,
    batch_axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Classic SAM (and ASAM with ``adaptive=True``), through the AACE-SAM machinery.

  ``update`` receives :math:`g = \nabla_w L_{\mathrm{CE}}(w)` and ascends it:

  .. math::
    w_{\mathrm{adv}} = w + \rho\, T^2 g \,/\, (\|T g\| + \epsilon),

  then returns ``optimizer``'s update for ``grad_fn(w_adv)`` taken at
  :math:`w`. Everything else, including the logged norms in
  :class:`SAMState`, is as in :func:`aace_sam`.

  Args:
    optimizer: the base optimizer.
    rho: the neighbourhood radius :math:`\rho \ge 0`; 0.05 is SAM's CIFAR-10
      value.
    normalize: divide by :math:`\|T g\| + \epsilon` (SAM's definition; turn
      off only to experiment).
    adaptive: ASAM's element-wise scaling :math:`T = |w|`.
    eps: :math:`\epsilon \ge 0`.
    batch_axis_name: a mapped axis over which both gradients are averaged.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SAMState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from aace_jax import sam
    >>> loss = lambda w: jnp.sum((w - 3.0) ** 2)
    >>> tx = sam(optax.sgd(0.1), rho=0.05)
    >>> w = jnp.zeros(2)
    >>> state = tx.init(w)
    >>> for _ in range(50):
    ...   updates, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
    ...   w = optax.apply_updates(w, updates)
    >>> print(w.round(2))
    [3. 3.]

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.

    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  return _sharpness_aware(
      "sam",
      optimizer,
      rho,
      ascent=True,
      normalize=normalize,
      adaptive=adaptive,
      eps=eps,
      batch_axis_name=batch_axis_name,
  )
