"""AACE-SAM and SAM as Optax gradient transformations.

Both are one mechanism: perturb the parameters along the gradient of a
perturbation loss, take the training-loss gradient there, and hand it to an
inner optimizer that updates the unperturbed parameters. They differ in the
loss the caller differentiates, the direction of the step and its scaling.
"""

import dataclasses
import functools
import sys
import warnings
from typing import Any
from typing import Callable
from typing import NamedTuple
from typing import Optional
from typing import Union

import jax
import jax.numpy as jnp
import optax

from aace_jax import _checks
from aace_jax._norms import global_norm
from aace_jax._norms import upcast

GradFn = Callable[[optax.Params], Any]
PerturbMask = Union[Any, Callable[[optax.Params], Any]]


# SAMState's names in 0.1.0 and the fields that replaced them; the old ones still read, with a warning, until 0.3.0.
RENAMED_STATE_FIELDS = {
  "perturbed_loss": "loss_at_w_adv",
  "perturbed_grad_norm": "grad_norm_at_w_adv",
  "perturbation_grad_norm": "first_pass_grad_norm",
}


def _renamed_field(old: str) -> property:
  new = RENAMED_STATE_FIELDS[old]

  def read(state):
    warnings.warn(
      f"SAMState.{old} is deprecated and will be removed in aace-jax 0.3.0: read SAMState.{new}.",
      DeprecationWarning,
      stacklevel=2,
    )
    return getattr(state, new)

  return property(read, doc=f"Deprecated: the 0.1.0 name of :attr:`{new}`.")


class SAMState(NamedTuple):
  """State of :func:`aace_sam` and :func:`sam`.

  The other fields describe the last call of ``update`` and are there for
  logging, so a training loop needs no third pass to know them. They are
  float32 scalars, zero before the first step. Read them from the state the
  update returned (inside ``optax.chain`` it is an element of the chain's
  tuple).

  Attributes:
    inner_state: the state of the wrapped optimizer.
    first_pass_grad_norm: the global L2 norm of the perturbation-loss
      gradient ``g`` (after averaging over ``batch_axis_name``), or of
      ``T * g`` when ``adaptive=True``, as the authors log ``grad_norm``.
    perturbation_norm: the global L2 norm of the perturbation
      ``w_adv - w`` actually applied, the authors' ``ew_norm`` (measured after
      ``w_adv`` is rounded to the parameters' dtype, so a perturbation that
      bfloat16 parameters cannot hold shows as 0).
    loss_at_w_adv: the training loss at ``w_adv`` when ``grad_fn`` returns
      it (``jax.value_and_grad``), NaN when it returns gradients alone.
    grad_norm_at_w_adv: the global L2 norm of ``grad_fn``'s gradient at
      ``w_adv`` (after averaging over ``batch_axis_name``), the gradient the
      inner optimizer receives.
    steps_since_perturbation: with ``perturb_every=k > 1``, an int32 in
      ``[0, k)``: the next update computes a new perturbation when it is 0;
      ``()`` (no leaf) when every update perturbs.
    kept_perturbation: with ``perturb_every > 1`` and reuse, the last
      perturbation ``w_adv - w`` computed, shaped like the parameters; ``()``
      otherwise. On the updates between, ``first_pass_grad_norm`` keeps the
      value of the update that computed it.
  """

  inner_state: optax.OptState
  first_pass_grad_norm: jax.Array
  perturbation_norm: jax.Array
  loss_at_w_adv: jax.Array
  grad_norm_at_w_adv: jax.Array
  steps_since_perturbation: Any = ()
  kept_perturbation: Any = ()

  perturbed_loss = _renamed_field("perturbed_loss")
  perturbed_grad_norm = _renamed_field("perturbed_grad_norm")
  perturbation_grad_norm = _renamed_field("perturbation_grad_norm")


def find_states(opt_state: optax.OptState, kind) -> list:
  """The states of type `kind` (a class or a tuple of them) in `opt_state`, outermost first, nested ones included."""
  found = []

  def visit(tree):
    for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind)):
      if isinstance(node, kind):
        found.append(node)
        visit(tuple(node))  # an injected optimizer inside an injected one, an inner SAMState

  visit(opt_state)
  return found


def perturbation_due(opt_state: optax.OptState) -> Optional[jax.Array]:
  """Whether the next update of the :class:`SAMState` in `opt_state` computes a new perturbation.

  A boolean scalar when a transformation there perturbs every ``k > 1``
  updates (the outermost one is read), None when every update perturbs or
  there is none: a train step skips its first pass when it is False, since
  the update then ignores the first-pass gradient it receives.
  """
  for node in find_states(opt_state, SAMState):
    if not isinstance(node.steps_since_perturbation, tuple):
      return node.steps_since_perturbation == 0
  return None


def with_perturbation_due(opt_state: optax.OptState, due: bool) -> optax.OptState:
  """`opt_state` with every ``perturb_every > 1`` counter set so that the next update perturbs anew or not.

  For a caller that decides on the host which updates compute a new
  perturbation (``make_train_step(..., new_perturbation=...)``): ``due``
  sets the counter to 0, ``not due`` moves a counter at 0 to 1, and the
  counter goes on from there.
  """

  def set_due(node):
    if not isinstance(node, SAMState):
      return node
    node = node._replace(inner_state=with_perturbation_due(node.inner_state, due))
    count = node.steps_since_perturbation
    if isinstance(count, tuple):
      return node
    return node._replace(steps_since_perturbation=jnp.zeros_like(count) if due else jnp.maximum(count, 1))

  return jax.tree.map(set_due, opt_state, is_leaf=lambda x: isinstance(x, SAMState))


def keeps_perturbation(opt_state: optax.OptState) -> bool:
  """Whether a :class:`SAMState` in `opt_state` keeps a perturbation between updates (reuse, ``k > 1``)."""
  return any(not isinstance(node.kept_perturbation, tuple) for node in find_states(opt_state, SAMState))


def _refuse_wrappers(owner: str, params) -> None:
  """Raises where an optax wrapper would silently change the algorithm.

  Both are trace-time checks: no cost per step.
  """
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  if any(is_masked(x) for x in jax.tree.leaves(params, is_leaf=is_masked)):
    raise TypeError(
      f"{owner} cannot run inside optax.masked: grad_fn would receive a partial tree and the"
      f" parameters outside the mask would be moved by the raw first-pass gradient. To perturb only"
      f" some parameters, pass {owner}(..., perturb_mask=mask) instead."
    )
  # optax.MultiSteps calls this update once per micro-batch with the running
  # mean of the perturbation gradients, and keeps the update of the last call:
  # the perturbation is the big batch's but the gradient at w_adv is only the
  # last micro-batch's. It cannot be made right from inside, and MultiSteps
  # marks nothing in the arguments, so its frame is looked for on the stack.
  frame = sys._getframe(2)
  for _ in range(64):
    if frame is None:
      break
    if isinstance(frame.f_locals.get("self"), optax.MultiSteps):
      raise ValueError(
        f"{owner} cannot run inside optax.MultiSteps: the update would use the perturbation of the"
        " accumulated gradient but the gradient at w_adv of the last micro-batch only. Accumulate"
        " with make_train_step(..., grad_accum_steps=k), or average your micro-batches' gradients"
        " yourself in both the first pass and grad_fn."
      )
    frame = frame.f_back


def named_weights(params) -> Any:
  """True for every leaf of `params` but those named ``bias``: the leaves ASAM's authors scale.

  Their code scales the parameters whose name holds ``weight`` (PyTorch's
  kernels and normalization scales) and leaves the biases alone; in Flax
  those are the leaves named ``kernel``, ``scale`` or ``embedding``, and the
  biases are named ``bias``.
  """

  def name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", "")))

  return jax.tree_util.tree_map_with_path(lambda path, _: not path or name(path[-1]) != "bias", params)


def _resolve_mask(owner: str, name: str, mask: Optional[PerturbMask], params):
  """A mask argument (`perturb_mask`, `adaptive_mask`) as a tree of Python bools shaped like `params` (None: all True).

  A mask given as a tree was checked when the transformation was built; one
  computed from `params` is checked here.
  """
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  if callable(mask):
    mask = mask(params)
    _check_mask_leaves(owner, name, mask)
  try:
    # A mask may be a prefix of the parameter tree, as for optax.masked.
    return jax.tree.map(lambda m, p: jax.tree.map(lambda _: m, p), mask, params)
  except ValueError as error:
    raise ValueError(
      f"{owner}: {name} must have the structure of params (or a prefix of it):"
      f" {jax.tree.structure(mask)} against {jax.tree.structure(params)}."
    ) from error


def _check_mask_leaves(owner: str, name: str, mask) -> None:
  for path, value in jax.tree_util.tree_leaves_with_path(mask):
    if not isinstance(value, bool):
      raise TypeError(
        f"{owner}: {name}'s leaves must be Python bools (the mask is static),"
        f" got {value!r} at {jax.tree_util.keystr(path)}."
      )


def _warn_if_rounded_away(owner: str, params, mask) -> None:
  low = sorted(
    {
      str(w.dtype)
      for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
      if m and jnp.issubdtype(w.dtype, jnp.floating) and jnp.finfo(w.dtype).bits < 32
    }
  )
  if low:
    warnings.warn(
      f"{owner}: parameters in {', '.join(low)} hold w_adv = w + e rounded to their dtype, so a"
      " perturbation smaller than their spacing is lost (SAMState.perturbation_norm shows what"
      " was applied). Keep float32 parameters and compute in low precision (Flax: param_dtype"
      " float32, dtype bfloat16).",
      stacklevel=4,
    )


def _same_shapes(tree, params) -> bool:
  if jax.tree.structure(tree) != jax.tree.structure(params):
    return False
  return all(jnp.shape(a) == jnp.shape(b) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(params)))


def _call_grad_fn(owner: str, grad_fn: GradFn, perturbed_params) -> tuple[jax.Array, optax.Updates]:
  """`grad_fn(w_adv)` as `(loss or NaN, gradients)`, whichever of jax's forms it returns."""
  try:
    result = grad_fn(perturbed_params)
  except TypeError as error:
    if type(perturbed_params).__module__.startswith("flax.nnx"):  # nnx.Optimizer hands the parameters as a State
      raise TypeError(
        f"{owner}: grad_fn is called with the perturbed parameters, here an nnx.State, and failed with"
        f" {type(error).__name__}: {error}. grad_fn must map parameters to gradients, not take a module;"
        " for an NNX model, aace_jax.nnx_sharpness_aware_grads(model, perturbation_loss_fn, loss_fn) gives"
        " the first-pass gradient and a grad_fn of that kind, for nnx.Optimizer.update(model, grads, grad_fn=...)."
      ) from error
    raise
  missing = jnp.full([], jnp.nan, jnp.float32)
  if _same_shapes(result, perturbed_params):
    return missing, result
  if isinstance(result, tuple) and len(result) == 2:
    first, second = result
    if _same_shapes(second, perturbed_params):  # jax.value_and_grad, with or without has_aux
      value = first[0] if isinstance(first, tuple) else first
      if jnp.shape(value) != ():
        raise ValueError(
          f"{owner}: grad_fn returned (value, grads) with a value of shape {jnp.shape(value)}, not a scalar loss."
        )
      return jnp.asarray(value, jnp.float32), second
    if _same_shapes(first, perturbed_params):  # jax.grad(..., has_aux=True)
      return missing, first
  raise ValueError(
    f"{owner}: grad_fn must return gradients with the structure and shapes of params"
    f" ({jax.tree.structure(perturbed_params)}), or (loss, gradients) as jax.value_and_grad"
    f" does, or (gradients, aux); it returned {jax.tree.structure(result)} with shapes"
    f" {[jnp.shape(x) for x in jax.tree.leaves(result)]}."
  )


@dataclasses.dataclass(frozen=True)
class _Settings:
  """What `_sharpness_aware` was built with, checked; the first argument of its init and update."""

  owner: str
  inner: optax.GradientTransformationExtraArgs
  rho: Any
  sign: float
  normalize: bool
  adaptive: bool
  adaptive_eta: Any
  adaptive_mask: Optional[PerturbMask]
  eps: Any
  max_perturbation_norm: Any
  perturb_mask: Optional[PerturbMask]
  batch_axis_name: Optional[str]
  perturb_every: int
  keeps: bool


def _init(settings: _Settings, params: optax.Params) -> SAMState:
  # One array per field: a shared buffer could not be donated twice.
  zero = lambda: jnp.zeros([], jnp.float32)
  return SAMState(
    inner_state=settings.inner.init(params),
    first_pass_grad_norm=zero(),
    perturbation_norm=zero(),
    loss_at_w_adv=zero(),
    grad_norm_at_w_adv=zero(),
    steps_since_perturbation=jnp.zeros([], jnp.int32) if settings.perturb_every > 1 else (),
    kept_perturbation=jax.tree.map(jnp.zeros_like, params) if settings.keeps else (),
  )


def _fresh_perturbation(settings: _Settings, grads, params, mask, scaled):
  """`(w_adv, norm of the gradient it came from, kept perturbation or ())` from this update's first-pass gradient."""
  if settings.batch_axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name=settings.batch_axis_name)
  # Unperturbed leaves drop out of the direction and of its norm.
  grads = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask)
  if settings.adaptive:
    # ASAM: the step is T^2 g / ||T g||, T = |w| + eta on the scaled leaves and 1 on the others.
    scale_by_t = lambda g, w, t: g * (jnp.abs(upcast(w)) + settings.adaptive_eta).astype(g.dtype) if t else g
    grads = jax.tree.map(scale_by_t, grads, params, scaled)
  grad_norm = global_norm(grads)
  if settings.adaptive:
    grads = jax.tree.map(scale_by_t, grads, params, scaled)
  scale = settings.sign * settings.rho
  if settings.normalize:
    denominator = grad_norm + settings.eps
    # A zero gradient gives a zero perturbation even with eps=0.
    scale = jnp.where(denominator > 0, scale / jnp.where(denominator > 0, denominator, 1), 0)
  if settings.max_perturbation_norm is not None:
    # ||e|| = |scale| ||direction||; the direction is g, or T^2 g whose norm is not ||T g||.
    step_norm = jnp.abs(scale) * (global_norm(grads) if settings.adaptive else grad_norm)
    longest = settings.max_perturbation_norm
    too_long = step_norm > longest
    scale = jnp.where(too_long, scale * longest / jnp.where(too_long, step_norm, 1), scale)
  perturbed_params = jax.tree.map(
    lambda w, g, m: (w + scale * upcast(g)).astype(w.dtype) if m else w, params, grads, mask
  )
  kept = ()
  if settings.keeps:
    kept = jax.tree.map(lambda w_adv, w: (w_adv - w).astype(w.dtype), perturbed_params, params)
  return perturbed_params, grad_norm.astype(jnp.float32), kept


def _between_perturbations(settings: _Settings, state: SAMState, params, mask):
  """w_adv from the kept perturbation (reuse), or w itself (plain steps); the first-pass gradient is unused."""
  perturbed_params = params
  if settings.keeps:
    perturbed_params = jax.tree.map(
      lambda w, e, m: (w + e).astype(w.dtype) if m else w, params, state.kept_perturbation, mask
    )
  return perturbed_params, state.first_pass_grad_norm, state.kept_perturbation


def _update(
  settings: _Settings,
  updates: optax.Updates,
  state: SAMState,
  params: Optional[optax.Params] = None,
  *,
  grad_fn: Optional[GradFn] = None,
  **extra_args,
) -> tuple[optax.Updates, SAMState]:
  owner = settings.owner
  if grad_fn is None:
    raise TypeError(
      f"{owner}.update needs grad_fn=, a function mapping parameters to the"
      " gradients of the training loss; it is called at the perturbed parameters. A wrapper"
      f" that does not pass extra arguments on drops it: optax.lookahead around {owner} is not"
      " supported (optax.with_extra_args_support(optax.lookahead(...)) drops grad_fn), and"
      " optax.MultiSteps, which make_train_step receives as such a wrapper, is refused: accumulate"
      " gradients with make_train_step(..., grad_accum_steps=k)."
    )
  if params is None:
    raise ValueError(f"{owner}.update needs params: the perturbation is applied to them.")
  _refuse_wrappers(owner, params)
  mask = _resolve_mask(owner, "perturb_mask", settings.perturb_mask, params)
  _warn_if_rounded_away(owner, params, mask)
  scaled = None
  if settings.adaptive:
    adaptive_mask = named_weights if settings.adaptive_mask is None else settings.adaptive_mask
    scaled = _resolve_mask(owner, "adaptive_mask", adaptive_mask, params)
  fresh = lambda: _fresh_perturbation(settings, updates, params, mask, scaled)
  if settings.perturb_every == 1:
    perturbed_params, grad_norm, kept_perturbation = fresh()
    steps_since_perturbation = ()
  else:
    count = state.steps_since_perturbation
    perturbed_params, grad_norm, kept_perturbation = jax.lax.cond(
      count == 0, fresh, lambda: _between_perturbations(settings, state, params, mask)
    )
    steps_since_perturbation = (count + 1) % settings.perturb_every
  perturbation_norm = global_norm(jax.tree.map(lambda w_adv, w: upcast(w_adv) - upcast(w), perturbed_params, params))
  loss_at_w_adv, perturbed_grads = _call_grad_fn(owner, grad_fn, perturbed_params)
  if settings.batch_axis_name is not None:
    loss_at_w_adv, perturbed_grads = jax.lax.pmean((loss_at_w_adv, perturbed_grads), axis_name=settings.batch_axis_name)
  updates, inner_state = settings.inner.update(perturbed_grads, state.inner_state, params, **extra_args)
  return updates, SAMState(
    inner_state=inner_state,
    first_pass_grad_norm=grad_norm,
    perturbation_norm=perturbation_norm.astype(jnp.float32),
    loss_at_w_adv=loss_at_w_adv,
    grad_norm_at_w_adv=global_norm(perturbed_grads).astype(jnp.float32),
    steps_since_perturbation=steps_since_perturbation,
    kept_perturbation=kept_perturbation,
  )


def _sharpness_aware(
  owner: str,
  optimizer: optax.GradientTransformation,
  rho,
  *,
  ascent: bool,
  normalize: bool,
  adaptive: bool,
  adaptive_eta,
  adaptive_mask: Optional[PerturbMask],
  eps,
  max_perturbation_norm,
  perturb_mask: Optional[PerturbMask],
  batch_axis_name: Optional[str],
  perturb_every: Optional[int],
  reuse_perturbation: bool,
) -> optax.GradientTransformationExtraArgs:
  """The one implementation behind `aace_sam` and `sam`: its arguments checked, its init and update."""
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(f"{owner}: optimizer must be an optax.GradientTransformation, got {optimizer!r}.")
  for name, value in (("rho", rho), ("eps", eps), ("adaptive_eta", adaptive_eta)):
    _checks.check_in_range(owner, name, value, 0.0, float("inf"))
  if max_perturbation_norm is not None:
    _checks.check_in_range(owner, "max_perturbation_norm", max_perturbation_norm, 0.0, float("inf"))
  for name, flag in (("normalize", normalize), ("adaptive", adaptive), ("reuse_perturbation", reuse_perturbation)):
    _checks.check_bool(owner, name, flag)
  perturb_every = 1 if perturb_every is None else perturb_every
  if isinstance(perturb_every, bool) or not isinstance(perturb_every, int) or perturb_every < 1:
    raise _checks.bad_argument(
      ValueError,
      owner,
      "perturb_every",
      "perturb_every must be a positive Python int (static; with optax.inject_hyperparams list it in"
      f" static_args), got {perturb_every!r}.",
    )
  for name, mask in (("perturb_mask", perturb_mask), ("adaptive_mask", adaptive_mask)):
    if mask is not None and not callable(mask):
      _check_mask_leaves(owner, name, mask)
  settings = _Settings(
    owner=owner,
    inner=optax.with_extra_args_support(optimizer),
    rho=rho,
    sign=1.0 if ascent else -1.0,
    normalize=normalize,
    adaptive=adaptive,
    adaptive_eta=adaptive_eta,
    adaptive_mask=adaptive_mask,
    eps=eps,
    max_perturbation_norm=max_perturbation_norm,
    perturb_mask=perturb_mask,
    batch_axis_name=batch_axis_name,
    perturb_every=perturb_every,
    keeps=perturb_every > 1 and reuse_perturbation,
  )
  return optax.GradientTransformationExtraArgs(functools.partial(_init, settings), functools.partial(_update, settings))


def aace_sam(
  optimizer: optax.GradientTransformation,
  rho: jax.typing.ArrayLike = 0.2,
  *,
  normalize: bool = False,
  adaptive: bool = False,
  adaptive_eta: jax.typing.ArrayLike = 0.01,
  adaptive_mask: Optional[PerturbMask] = None,
  eps: jax.typing.ArrayLike = 1e-12,
  max_perturbation_norm: Optional[jax.typing.ArrayLike] = None,
  perturb_mask: Optional[PerturbMask] = None,
  batch_axis_name: Optional[str] = None,
  perturb_every: Optional[int] = None,
  reuse_perturbation: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""AACE-SAM: sharpness-aware minimization with an AACE perturbation.

  ``update`` receives :math:`g = \nabla_w L_{\mathrm{AACE}}(w)`, the gradient
  of the perturbation loss (:func:`aace_cross_entropy` averaged over the
  batch) at the current parameters, and descends it:

  .. math::
    w_{\mathrm{adv}} = w - \rho\, T^2 g \,/\, s, \qquad
    s = \begin{cases} \|T g\| + \epsilon & \text{normalize} \\
                      1 & \text{otherwise} \end{cases}

  with :math:`T = 1` or, when ``adaptive`` (ASAM), the element-wise
  :math:`T = |w| + \eta` on the leaves ``adaptive_mask`` selects and
  :math:`T = 1` on the others, as ASAM's authors' code does: without
  :math:`\eta` a leaf that starts at zero (a bias, a BatchNorm shift, a
  zero-initialized head) would never be perturbed. With
  ``max_perturbation_norm`` :math:`c`, a perturbation
  :math:`e = w_{adv} - w` longer than :math:`c` is scaled to length :math:`c`.
  It then calls ``grad_fn(w_adv)`` for the training-loss gradient
  :math:`\nabla_w L_{\mathrm{CE}}(w_{\mathrm{adv}})` and returns
  ``optimizer``'s update for that gradient, taken at :math:`w` (weight decay
  in ``optimizer`` therefore acts on :math:`w`, not :math:`w_{adv}`).

  The paper's perturbation is not normalized, and it grows as the model
  becomes confident. On a network with a layer that no normalization
  follows (a dense hidden layer, say), ``rho=0.2`` can move :math:`w_{adv}`
  so far that the updates fit :math:`w_{adv}` and leave :math:`w` behind
  (docs/experiments.md, "When AACE-SAM breaks down"). ``max_perturbation_norm``
  bounds it and leaves every shorter perturbation as the paper computes it;
  ``normalize=True`` fixes its length instead.

  Cheaper steps (``perturb_every=k > 1``): only every k-th update computes
  :math:`e = w_{adv} - w` from the first-pass gradient; the updates between
  ignore the gradient they receive (a train step need not compute it:
  :func:`make_train_step` skips its first pass then) and take
  ``grad_fn`` at :math:`w + e` with the kept :math:`e`
  (``reuse_perturbation=True``, one more parameter-sized buffer in the
  state), or at :math:`w` itself (``False``: plain steps between
  sharpness-aware ones, as Composer's ``SAM(interval=k)``). AACE's
  successive perturbations point much the same way, SAM's much less (the
  documentation's "Cheaper steps", docs/experiments.md). ``k = 1`` is the transformation above, bit for
  bit.

  ``update(updates, state, params, *, grad_fn, **extra_args)``: ``grad_fn``
  is called once, at :math:`w_{adv}`, and returns the training-loss gradient
  shaped like ``params``, or ``(loss, gradient)`` as ``jax.value_and_grad``
  returns it (``has_aux`` too; the loss is kept in
  :attr:`SAMState.loss_at_w_adv`, the aux dropped), or ``(gradient, aux)``
  as ``jax.grad(..., has_aux=True)`` does. Any other tree is an error. The
  other extra arguments go to ``optimizer``. ``grad_fn`` must evaluate the
  same function of the weights as the pass that produced ``updates``: the
  same batch and the same randomness, in particular the same dropout key,
  or the perturbation is computed for one network and the update for
  another. Model state that the first pass updated (BatchNorm running
  statistics) should be kept from the first pass and not from ``grad_fn``'s.

  Composition with the rest of Optax:

  - ``optax.chain(t, aace_sam(opt))``: ``t`` transforms the first-pass
    gradient only, so ``clip_by_global_norm`` there clips the perturbation
    direction (a no-op under ``normalize=True``); ``aace_sam(optax.chain(t,
    opt))`` transforms the gradient at :math:`w_{adv}`, the one that updates
    the weights; a transformation after ``aace_sam`` acts on the update.
  - ``optax.apply_if_finite`` outside sees only the first-pass gradient;
    ``aace_sam(optax.apply_if_finite(opt, k))`` sees the gradient at
    :math:`w_{adv}`, which is non-finite whenever the first one is.
  - ``optax.MultiSteps`` and ``optax.masked`` are refused (see
    ``make_train_step(grad_accum_steps=...)`` and ``perturb_mask``).
  - ``optax.inject_hyperparams`` schedules ``rho`` (and ``optimizer``'s
    hyperparameters when ``optimizer`` is itself injected).
  - Parameters in bfloat16 or float16 round :math:`w_{adv}` to their dtype
    and lose a perturbation smaller than their spacing: a warning says so
    at trace time; keep float32 parameters and compute in low precision.

  Args:
    optimizer: the base optimizer, e.g. ``optax.chain(
      optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))``.
    rho: the perturbation size :math:`\rho \ge 0`; 0.2 in the paper.
    normalize: divide the step by :math:`\|T g\| + \epsilon` (the authors'
      ``use_grad_norm``; off in all their runs).
    adaptive: ASAM's element-wise scaling :math:`T = |w| + \eta`.
    adaptive_eta: :math:`\eta \ge 0`; 0.01 as in ASAM's authors' code.
    adaptive_mask: the leaves scaled by :math:`T = |w| + \eta` (the others
      by 1), as a tree or function like ``perturb_mask``; None selects
      every leaf not named ``bias`` (:func:`named_weights`: the authors
      scale PyTorch's ``weight`` parameters, Flax's ``kernel``, ``scale``
      and ``embedding``).
    eps: :math:`\epsilon \ge 0`, used when ``normalize``.
    max_perturbation_norm: :math:`c \ge 0`, the longest perturbation
      :math:`\|w_{adv} - w\|` applied; None (the paper) bounds nothing.
    perturb_mask: which parameters to perturb: a tree of Python bools with
      the structure of ``params`` (or a prefix of it), or a function of
      ``params`` returning one, as for ``optax.masked``. Unperturbed leaves
      keep :math:`w` in ``grad_fn`` and leave the direction's norm; every
      parameter is still updated by ``optimizer``. None perturbs all.
    batch_axis_name: a mapped axis (``jax.pmap``/``shard_map``) over which both
      gradients are averaged before use.
    perturb_every: compute a new perturbation every this many updates, a
      positive Python int; None or 1 (the paper): on every update. (None, so
      that ``optax.inject_hyperparams`` does not take it for a
      hyperparameter; a k given there belongs in its ``static_args``.)
    reuse_perturbation: between new perturbations, apply the kept one
      (True) or none (False); unused when ``perturb_every=1``.

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
    adaptive_eta=adaptive_eta,
    adaptive_mask=adaptive_mask,
    eps=eps,
    max_perturbation_norm=max_perturbation_norm,
    perturb_mask=perturb_mask,
    batch_axis_name=batch_axis_name,
    perturb_every=perturb_every,
    reuse_perturbation=reuse_perturbation,
  )


def sam(
  optimizer: optax.GradientTransformation,
  rho: jax.typing.ArrayLike = 0.05,
  *,
  normalize: bool = True,
  adaptive: bool = False,
  adaptive_eta: jax.typing.ArrayLike = 0.01,
  adaptive_mask: Optional[PerturbMask] = None,
  eps: jax.typing.ArrayLike = 1e-12,
  max_perturbation_norm: Optional[jax.typing.ArrayLike] = None,
  perturb_mask: Optional[PerturbMask] = None,
  batch_axis_name: Optional[str] = None,
  perturb_every: Optional[int] = None,
  reuse_perturbation: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Classic SAM (and ASAM with ``adaptive=True``), through the AACE-SAM machinery.

  ``update`` receives :math:`g = \nabla_w L_{\mathrm{CE}}(w)` and ascends it:

  .. math::
    w_{\mathrm{adv}} = w + \rho\, T^2 g \,/\, (\|T g\| + \epsilon),

  then returns ``optimizer``'s update for ``grad_fn(w_adv)`` taken at
  :math:`w`. Everything else, including what ``grad_fn`` may return, the
  rule that it uses the first pass's dropout key, the values logged in
  :class:`SAMState` and the composition rules, is as in :func:`aace_sam`.

  Args:
    optimizer: the base optimizer.
    rho: the neighbourhood radius :math:`\rho \ge 0`; 0.05 is SAM's CIFAR-10
      value.
    normalize: divide by :math:`\|T g\| + \epsilon` (SAM's definition; turn
      off only to experiment).
    adaptive: ASAM's element-wise scaling :math:`T = |w| + \eta`.
    adaptive_eta: :math:`\eta \ge 0`, as in :func:`aace_sam`.
    adaptive_mask: the leaves :math:`T` scales, as in :func:`aace_sam`.
    eps: :math:`\epsilon \ge 0`.
    max_perturbation_norm: the longest perturbation applied, as in
      :func:`aace_sam` (only useful with ``normalize=False``).
    perturb_mask: which parameters to perturb, as in :func:`aace_sam`.
    batch_axis_name: a mapped axis over which both gradients are averaged.
    perturb_every: compute a new perturbation every this many updates, as
      in :func:`aace_sam`.
    reuse_perturbation: between new perturbations, apply the kept one
      (LookSAM-like reuse of the whole perturbation) or none (Composer's
      ``SAM(interval=k)``).

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
    adaptive_eta=adaptive_eta,
    adaptive_mask=adaptive_mask,
    eps=eps,
    max_perturbation_norm=max_perturbation_norm,
    perturb_mask=perturb_mask,
    batch_axis_name=batch_axis_name,
    perturb_every=perturb_every,
    reuse_perturbation=reuse_perturbation,
  )
