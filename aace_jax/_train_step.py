"""One pure training step for SGD, SAM and AACE-SAM, and an evaluation step.

The step is a pure function `(state, batch) -> (state, metrics)`: jit it,
pmap it or shard_map it (see `_parallel.py`). Both passes, the perturbation,
the optimizer update and the BatchNorm bookkeeping happen inside it, so a
compiled step is one XLA program with no host round trip.
"""

import dataclasses
import functools
import inspect
import warnings
from typing import Any
from typing import Callable
from typing import NamedTuple
from typing import Optional
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aace_jax import _checks
from aace_jax import _losses
from aace_jax import _sam
from aace_jax._norms import all_finite
from aace_jax._norms import global_norm
from aace_jax._norms import upcast

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
PerExampleLoss = Callable[..., jax.Array]


class ApplyFn(Protocol):
  """`apply_fn(params, model_state, images, *, train, rng) -> (logits, new_model_state)`."""

  def __call__(self, params, model_state, images, *, train: bool, rng: jax.Array) -> tuple[jax.Array, Any]: ...


class LossInputs(NamedTuple):
  """What a :class:`LogitsFn` returns for a batch: the losses' inputs and the new model state.

  Attributes:
    logits: unnormalized scores, shape ``[..., C]`` (``[batch, C]`` for a
      classifier, ``[batch, length, C]`` for a language model).
    targets: the true class of each prediction, integers of shape
      ``logits.shape[:-1]``.
    weights: how much each prediction counts, shape ``targets.shape``
      (a padding mask: 1 for real tokens, 0 for padding), or None: all
      count alike. A target of weight 0 may hold any value.
    model_state: the new non-trainable model state (``{}`` for none); in
      evaluation, ignored.
  """

  logits: jax.Array
  targets: jax.Array
  weights: Optional[jax.Array]
  model_state: Any


class LogitsFn(Protocol):
  """`logits_fn(params, model_state, batch, *, train, rng) -> LossInputs` for a batch of any structure."""

  def __call__(self, params, model_state, batch, *, train: bool, rng: jax.Array) -> LossInputs: ...


class TrainState(NamedTuple):
  """Everything a training step reads and writes; a pytree.

  Attributes:
    step: the number of steps taken, an int32 scalar.
    params: the model's trainable parameters.
    model_state: non-trainable model variables, e.g. ``{"batch_stats": ...}``
      for BatchNorm; ``{}`` when there are none.
    opt_state: the state of the optax transformation.
    rng: the run's base PRNG key; the step derives its keys from it and
      ``step`` (and the device index when mapped), so it never changes.
  """

  step: jax.Array
  params: optax.Params
  model_state: Any
  opt_state: optax.OptState
  rng: jax.Array

  @classmethod
  def create(cls, *, params, tx: optax.GradientTransformation, rng: jax.Array, model_state=None) -> "TrainState":
    """A state at step 0 with `tx` initialized on `params`."""
    return cls(
      step=jnp.zeros([], jnp.int32),
      params=params,
      model_state={} if model_state is None else model_state,
      opt_state=tx.init(params),
      rng=rng,
    )


# The names of make_train_step's metrics, each described in its docstring (Returns).
STEP_METRICS = (
  "loss",
  "accuracy",
  "first_pass_loss",
  "loss_at_w_adv",
  "grad_norm",
  "first_pass_grad_norm",
  "perturbation_norm",
  "param_norm",
  "skipped_steps",
  "learning_rate",
)


# Step metrics renamed since 0.1.0, and their names now; the old keys still read, with a warning, until 0.3.0.
RENAMED_METRICS = {
  "perturbation_loss": "first_pass_loss",
  "perturbed_loss": "loss_at_w_adv",
  "perturbation_grad_norm": "first_pass_grad_norm",
}


class StepMetrics(dict):
  """The metrics a train step returns: a dict (and a pytree, so it passes through ``jax.jit`` and the parallel
  wrappers), whose keys renamed since 0.1.0 (`RENAMED_METRICS`) still read, with a ``DeprecationWarning``."""

  def __missing__(self, key):
    if key not in RENAMED_METRICS:
      raise KeyError(key)
    warnings.warn(
      f"the step metric {key!r} is deprecated and will be removed in aace-jax 0.3.0: read"
      f" metrics[{RENAMED_METRICS[key]!r}].",
      DeprecationWarning,
      stacklevel=2,
    )
    return self[RENAMED_METRICS[key]]


jax.tree_util.register_pytree_with_keys(
  StepMetrics,
  lambda metrics: ([(jax.tree_util.DictKey(k), v) for k, v in sorted(metrics.items())], sorted(metrics)),
  lambda keys, values: StepMetrics(zip(keys, values)),
  flatten_func=lambda metrics: ([v for _, v in sorted(metrics.items())], sorted(metrics)),
)


@dataclasses.dataclass(frozen=True)
class Step:
  """A pure step function and what the parallel wrappers need to know of it.

  :func:`make_train_step` and :func:`make_eval_step` return one; it calls
  like the function it holds, so ``jax.jit(step)`` works as for any
  function. :func:`pmap_step` and :func:`shard_step` read ``axis_name``
  (to check the mapped axis is the one the step averages over) and
  ``returns_state`` (to donate the old state only when a new one comes
  back). Wrap a step of your own as ``Step(fn, axis_name="data",
  returns_state=True)`` to map it the same way.

  Attributes:
    fn: ``fn(state, batch) -> (state, metrics)`` when ``returns_state``,
      ``fn(state, batch) -> metrics`` otherwise.
    axis_name: the mapped axis ``fn``'s collectives (``pmean``, ``psum``)
      name, or None for a step that runs on one device.
    returns_state: whether ``fn`` returns a new state.
  """

  fn: Callable[..., Any]
  axis_name: Optional[str] = None
  returns_state: bool = True
  with_new_perturbation: Optional[Callable[[bool], "Step"]] = None

  def __call__(self, state, batch):
    return self.fn(state, batch)

  def jit(self, **jit_kwargs) -> "CompiledStep":
    """The step compiled with ``jax.jit(fn, **jit_kwargs)``, as a :class:`CompiledStep`.

    For a ``tx`` that perturbs every ``k > 1`` updates it holds two
    programs, the update that computes a new perturbation and the one
    between, and picks one on the host each step; any other step is one
    program. ``jax.jit(step)`` instead compiles the one-program form.
    """
    return CompiledStep(self, lambda step: jax.jit(step.fn, **jit_kwargs))


class CompiledStep:
  """A :class:`Step` compiled: called as the step, ``compiled(state, batch) -> (state, metrics)``.

  Where the step's ``tx`` perturbs every ``k > 1`` updates (``aace_sam(...,
  perturb_every=k)``) and the step was built with ``new_perturbation=None``,
  the update that computes a new perturbation and the update between (one
  pass) are two compiled programs with no conditional, and each call runs
  the one the optimizer state's counter asks for
  (``SAMState.steps_since_perturbation``, one int32 read to the host per
  step: a skipped non-finite step and a state restored in the middle of a
  cycle are followed exactly). This is the fast form on every backend: XLA's
  CPU backend runs backward convolutions inside a conditional several times
  slower than outside one (``benchmarks/RESULTS.md``). Any other step, a
  state with no counter, and a call under a trace (``jax.jit`` around the
  compiled step) run the step as one program.

  :meth:`Step.jit`, :func:`shard_step` and :func:`pmap_step` return one.
  ``program(new_perturbation)`` is the program itself (None: the
  one-program form), for a caller that knows from the step number which
  update comes next, as the trainer does.

  Args:
    step: the :class:`Step`.
    compile: ``compile(step) -> callable``, how a step becomes a program
      (``jax.jit``, ``jax.pmap`` or ``jax.jit`` over ``jax.shard_map``).
  """

  def __init__(self, step: Step, compile: Callable[[Step], Callable]):
    self.step, self._compile, self._programs = step, compile, {}
    # Whether the states seen so far have a counter: a state without one keeps the one-program form without
    # looking through its optimizer state again (the form is right for any state; only its speed differs).
    self._cycles = step.with_new_perturbation is not None

  def program(self, new_perturbation: Optional[bool] = None) -> Callable:
    """The compiled program that always (True) / never (False) computes a new perturbation, or (None) the step
    as built; each compiled once, when first asked for."""
    if new_perturbation is not None and self.step.with_new_perturbation is None:
      new_perturbation = None  # a step whose tx has no perturbation cycle: one program
    if new_perturbation not in self._programs:
      step = self.step if new_perturbation is None else self.step.with_new_perturbation(new_perturbation)
      self._programs[new_perturbation] = self._compile(step)
    return self._programs[new_perturbation]

  def __call__(self, state, batch):
    due = _sam.perturbation_due(getattr(state, "opt_state", None)) if self._cycles else None
    if due is None:
      self._cycles = False
    if due is None or isinstance(due, jax.core.Tracer):
      return self.program(None)(state, batch)
    return self.program(bool(np.asarray(due).flat[0]))(state, batch)  # pmap: one counter per device, all equal


def linen_apply_fn(module) -> ApplyFn:
  """Adapts a Flax Linen module whose ``__call__`` takes ``train`` to `ApplyFn`.

  ``params`` is the ``"params"`` collection and ``model_state`` holds the
  other collections (``{"batch_stats": ...}``); in training they are mutable
  and their new values are returned, and ``rng`` (may be None) feeds the
  ``"dropout"`` stream.

  Args:
    module: a ``flax.linen.Module``.

  Returns:
    ``apply_fn(params, model_state, images, *, train, rng)``.
  """
  if not callable(getattr(module, "apply", None)) or not callable(getattr(module, "init", None)):
    raise TypeError(
      f"linen_apply_fn: {type(module).__name__} is not a Flax Linen module (no .apply/.init); for a Flax NNX"
      " model use graphdef, params, model_state = aace_jax.nnx_split(model) and aace_jax.nnx_apply_fn(graphdef)."
    )

  def apply_fn(params, model_state, images, *, train, rng):
    variables = {"params": params, **model_state}
    if train:
      rngs = {} if rng is None else {"dropout": rng}
      return module.apply(variables, images, train=True, rngs=rngs, mutable=list(model_state))
    return module.apply(variables, images, train=False), model_state

  return apply_fn


def classifier_logits_fn(apply_fn: ApplyFn, *, mask_key: Optional[str] = None) -> LogitsFn:
  """The :class:`LogitsFn` of an image classifier: ``batch["image"]`` in, one ``batch["label"]`` per example.

  Args:
    apply_fn: ``apply_fn(params, model_state, images, *, train, rng) ->
      (logits, new_model_state)``.
    mask_key: the batch entry holding each example's weight (the eval
      step's ``"mask"``), or None: every example counts.

  Returns:
    ``logits_fn(params, model_state, batch, *, train, rng) -> LossInputs``.
  """

  def logits_fn(params, model_state, batch, *, train, rng):
    logits, new_model_state = apply_fn(params, model_state, batch["image"], train=train, rng=rng)
    weights = batch.get(mask_key) if mask_key is not None else None
    return LossInputs(logits, batch["label"], weights, new_model_state)

  return logits_fn


def _one_model_fn(owner: str, apply_fn: Optional[ApplyFn], logits_fn: Optional[LogitsFn], **adapter) -> LogitsFn:
  """The step's `LogitsFn`: `logits_fn`, or the image classifier's of `apply_fn`; exactly one is given."""
  if (apply_fn is None) == (logits_fn is None):
    raise TypeError(
      f"{owner}: give either apply_fn (an image classifier: batch['image'], batch['label']) or logits_fn="
      f" (any batch and targets), not {'both' if apply_fn is not None else 'neither'}."
    )
  model_fn = apply_fn if logits_fn is None else logits_fn
  if not callable(model_fn):
    raise TypeError(f"{owner}: {'apply_fn' if logits_fn is None else 'logits_fn'} must be callable, got {model_fn!r}.")
  return classifier_logits_fn(apply_fn, **adapter) if logits_fn is None else logits_fn


def _checked_loss_inputs(owner: str, outputs) -> LossInputs:
  """`outputs` of a `LogitsFn` as `LossInputs`, checked at trace time; targets of weight 0 set to class 0."""
  if not (isinstance(outputs, tuple) and len(outputs) == 4):
    raise TypeError(
      f"{owner}: logits_fn must return (logits, targets, weights or None, new_model_state), a LossInputs;"
      f" got {type(outputs).__name__} {jax.tree.structure(outputs)}."
    )
  logits, targets, weights, model_state = outputs
  logits, targets = jnp.asarray(logits), jnp.asarray(targets)
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    if targets.shape == logits.shape:
      raise TypeError(
        f"{owner}: the targets are a distribution over the classes (shape {targets.shape}, {targets.dtype}),"
        " as mixup or cutmix make. AACE's adversarial target needs each prediction's one true class y"
        " (q_y = min(p_y, th), the rest spread over the other classes), which a soft target does not have:"
        " return integer targets (label smoothing: loss=functools.partial(cross_entropy, label_smoothing=s))."
      )
    raise TypeError(f"{owner}: targets must be integer classes, got dtype {targets.dtype}.")
  if targets.shape != logits.shape[:-1]:
    raise ValueError(
      f"{owner}: targets of shape {targets.shape} do not match logits of shape {logits.shape};"
      f" expected {logits.shape[:-1]}."
    )
  if weights is not None:
    weights = jnp.asarray(weights)
    if weights.shape != targets.shape:
      raise ValueError(f"{owner}: weights of shape {weights.shape} do not match targets of shape {targets.shape}.")
    weights = upcast(weights.astype(jnp.result_type(weights.dtype, jnp.float32)))
    # A padded position may hold any target; an out-of-range one would make its loss, and 0 * NaN, NaN.
    targets = jnp.where(weights > 0, targets, 0)
  return LossInputs(logits, targets, weights, model_state)


def _batch_mean(per_target: jax.Array, weights: Optional[jax.Array]) -> jax.Array:
  """The mean of per-target values, weighted by `weights` (0 when every weight is 0)."""
  if weights is None:
    return per_target.mean()
  total = jnp.sum(weights)
  return jnp.sum(upcast(per_target) * weights) / jnp.where(total > 0, total, 1)


def _batch_size(owner: str, batch) -> int:
  """The leading dimension every leaf of `batch` shares."""
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
      f"{owner}: every array of the batch must have the same leading (example) dimension, got shapes"
      f" {[jnp.shape(x) for x in jax.tree.leaves(batch)]}."
    )
  return sizes.pop()


def _accepts_key(loss_fn: PerExampleLoss) -> bool:
  try:
    return "key" in inspect.signature(loss_fn).parameters
  except (TypeError, ValueError):
    return False


def _calls_grad_fn(tx, opt_state, params) -> bool:
  """Whether `tx.update` asks for `grad_fn` (a sharpness-aware transformation).

  A state holding a `SAMState` is one of ours, which does; any other is
  decided by an abstract trace of `tx.update` at trace time (no compiled
  work, no cost per step, but a few seconds of tracing for a deep network).
  """
  if _sam.find_states(opt_state, _sam.SAMState):
    return True
  called = []

  def record(w):  # returns what the step's grad_fn returns: (loss, gradient)
    called.append(True)
    return jnp.zeros([]), w

  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  tx = optax.with_extra_args_support(tx)
  jax.eval_shape(lambda g, s, p: tx.update(g, s, p, grad_fn=record), shapes, opt_state, shapes)
  return bool(called)


def _learning_rate(opt_state) -> Optional[jax.Array]:
  for state in _sam.find_states(opt_state, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)):
    if "learning_rate" in state.hyperparams:
      return jnp.asarray(state.hyperparams["learning_rate"], jnp.float32)
  return None


@dataclasses.dataclass(frozen=True)
class _StepSettings:
  """What :func:`make_train_step` was built with, checked; the first argument of the step's functions."""

  model_fn: LogitsFn
  tx: optax.GradientTransformationExtraArgs
  perturbation_loss: PerExampleLoss
  loss: PerExampleLoss
  axis_name: Optional[str]
  sync_perturbation: bool
  grad_accum_steps: int
  perturbation_batch_fraction: float
  new_perturbation: Optional[bool]
  conditional_first_pass: bool
  skip_nonfinite: bool
  extra_metrics: dict


class _Pass(NamedTuple):
  """One forward and backward pass over a (per-device) batch.

  Attributes:
    value: the objective's mean on this device (weighted, with weights).
    outputs: the model's :class:`LossInputs` over the whole batch, micro-batches merged.
    grads: the objective's mean gradient, over every device's batch when the pass averaged over devices.
  """

  value: jax.Array
  outputs: LossInputs
  grads: Any


class _Update(NamedTuple):
  """What an update path of the step gives back before the non-finite guard."""

  updates: Any
  model_state: Any
  opt_state: optax.OptState
  metrics: Metrics
  finite: jax.Array


def _average(tree, axis_name: Optional[str]):
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _objective(loss_fn: PerExampleLoss, outputs: LossInputs, **extra):
  """`(objective, weight_sum)`: the batch mean of `loss_fn` (weight_sum None), or, with weights, its weighted sum."""
  per_target = loss_fn(outputs.logits, outputs.targets, **extra)
  if outputs.weights is None:
    return per_target.mean(), None
  return jnp.sum(upcast(per_target) * outputs.weights), jnp.sum(outputs.weights)


def _merged(outputs: LossInputs) -> LossInputs:
  """Outputs stacked over micro-batches as one batch: the model state averaged over them."""
  flat = lambda x: None if x is None else x.reshape(-1, *x.shape[2:])
  return LossInputs(
    flat(outputs.logits),
    flat(outputs.targets),
    flat(outputs.weights),
    jax.tree.map(lambda x: x.mean(0), outputs.model_state),
  )


def _run_pass(settings: _StepSettings, params, batch, forward, loss_fn, *, loss_key=None, over_devices: bool) -> _Pass:
  """The value and gradient of `loss_fn` at `params` over `batch`, its micro-batches and, when `over_devices`, devices.

  With k micro-batches a scan takes k equal slices of the batch, holding one
  slice's activations at a time. A mean objective is averaged over
  micro-batches and devices; a weighted one is summed and divided by the sum
  of the weights, over all devices for the gradient. `loss_key`, folded with
  the micro-batch index, goes to a loss that takes `key`.
  """

  def objective(params, batch, index):
    outputs = forward(params, batch, index)
    extra = {} if loss_key is None else {"key": jax.random.fold_in(loss_key, index)}
    value, weight_sum = _objective(loss_fn, outputs, **extra)
    return value, (weight_sum, outputs)

  micro_batches = settings.grad_accum_steps
  if micro_batches == 1:
    (value, (weight_sum, outputs)), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, 0)
  else:
    size = _batch_size("make_train_step", batch)
    if size % micro_batches:
      raise ValueError(
        f"make_train_step: a batch of {size} examples does not split into"
        f" grad_accum_steps={micro_batches} equal micro-batches."
      )
    split = lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:])

    def accumulate(grad_sum, micro):
      (value, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, *micro)
      return jax.tree.map(jnp.add, grad_sum, grads), (value, aux)

    grad_sum, (values, (weight_sums, outputs)) = jax.lax.scan(
      accumulate, jax.tree.map(jnp.zeros_like, params), (jax.tree.map(split, batch), jnp.arange(micro_batches))
    )
    outputs = _merged(outputs)
    if weight_sums is None:
      value, weight_sum, grads = values.mean(), None, jax.tree.map(lambda g: g / micro_batches, grad_sum)
    else:
      value, weight_sum, grads = values.sum(), weight_sums.sum(), grad_sum
  if weight_sum is None:
    return _Pass(value, outputs, _average(grads, settings.axis_name) if over_devices else grads)
  value = value / jnp.where(weight_sum > 0, weight_sum, 1)
  if over_devices and settings.axis_name is not None:
    weight_sum, grads = jax.lax.psum((weight_sum, grads), settings.axis_name)
  scale = 1 / jnp.where(weight_sum > 0, weight_sum, 1)
  return _Pass(value, outputs, jax.tree.map(lambda g: g * scale.astype(g.dtype), grads))


def _loss_mean(loss_fn: PerExampleLoss, outputs: LossInputs, loss_rng) -> jax.Array:
  """The batch mean of `loss_fn` on a pass's outputs; `loss_rng` goes to a loss that takes `key`."""
  extra = {"key": loss_rng} if _accepts_key(loss_fn) else {}
  return _batch_mean(loss_fn(outputs.logits, outputs.targets, **extra), outputs.weights)


def _observed_metrics(settings: _StepSettings, outputs: LossInputs, loss_rng) -> Metrics:
  """What a pass's logits tell, for observation (no gradient flows from here): loss, accuracy, extra metrics."""
  metrics = {
    "loss": _batch_mean(settings.loss(outputs.logits, outputs.targets), outputs.weights),
    "accuracy": _batch_mean(jnp.argmax(outputs.logits, -1) == outputs.targets, outputs.weights),
  }
  for name, fn in settings.extra_metrics.items():
    metrics[name] = jax.lax.stop_gradient(_loss_mean(fn, outputs, loss_rng))
  return metrics


def _first_pass_batch(settings: _StepSettings, batch):
  """The leading `perturbation_batch_fraction` of a (per-device) batch, the first pass's part."""
  fraction = settings.perturbation_batch_fraction
  if fraction == 1:
    return batch
  size = _batch_size("make_train_step", batch)
  count = round(fraction * size)
  if count < settings.grad_accum_steps or count % settings.grad_accum_steps:
    raise ValueError(
      f"make_train_step: perturbation_batch_fraction={fraction} of a batch of {size} examples is {count},"
      f" which does not split into grad_accum_steps={settings.grad_accum_steps} equal micro-batches."
    )
  return jax.tree.map(lambda x: x[:count], batch)


def _first_pass(settings: _StepSettings, state: TrainState, batch, forward, loss_rng):
  """The first pass where the update needs it: `(opt_state, due, pass)`.

  `due` is None when every update perturbs anew, else whether this one does
  (a bool, or a traced one decided on the device); when it does not, the
  pass is zeros (under a conditional when `due` is traced: the pass does not
  run).
  """
  opt_state = state.opt_state
  due = _sam.perturbation_due(opt_state)
  if due is not None:
    if settings.axis_name is not None and not settings.sync_perturbation and _sam.keeps_perturbation(opt_state):
      raise ValueError(
        "make_train_step: sync_perturbation=False with a kept perturbation (perturb_every > 1,"
        " reuse_perturbation=True) would keep a different perturbation on each device in a state that"
        " must be the same on all; use sync_perturbation=True, or reuse_perturbation=False."
      )
    if settings.new_perturbation is not None:
      due = settings.new_perturbation
      opt_state = _sam.with_perturbation_due(opt_state, due)
  loss_key = loss_rng if _accepts_key(settings.perturbation_loss) else None
  first_batch = _first_pass_batch(settings, batch)

  def run():
    return _run_pass(
      settings,
      state.params,
      first_batch,
      forward,
      settings.perturbation_loss,
      loss_key=loss_key,
      over_devices=settings.sync_perturbation,
    )

  skipped = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run))
  if due is None or due is True:
    return opt_state, due, run()
  if due is False:
    return opt_state, due, skipped()
  if settings.conditional_first_pass:  # between perturbations the first pass does not run
    return opt_state, due, jax.lax.cond(due, run, skipped)
  # XLA's CPU backend runs backward convolutions inside a conditional several times slower than outside one: the
  # pass runs every step, and its results are kept where the step perturbs anew.
  return opt_state, due, jax.tree.map(lambda ran, zero: jnp.where(due, ran, zero), run(), skipped())


def _sharpness_aware_update(settings: _StepSettings, state: TrainState, batch, forward, loss_rng) -> _Update:
  """The first pass (where `tx` needs it), the perturbation and the pass at w_adv through `tx`'s `grad_fn`."""
  opt_state, due, first = _first_pass(settings, state, batch, forward, loss_rng)
  second_passes = []

  def grad_fn(perturbed_params):
    second = _run_pass(settings, perturbed_params, batch, forward, settings.loss, over_devices=True)
    second_passes.append(second)
    return _average(second.value, settings.axis_name), second.grads

  updates, opt_state = settings.tx.update(first.grads, opt_state, state.params, grad_fn=grad_fn)
  sam_states = _sam.find_states(opt_state, _sam.SAMState)
  sam_state = sam_states[0] if sam_states else None
  missing = jnp.full([], jnp.nan, jnp.float32)
  metrics = {
    "first_pass_loss": first.value,
    "loss_at_w_adv": sam_state.loss_at_w_adv if sam_state else missing,
    "grad_norm": sam_state.grad_norm_at_w_adv if sam_state else missing,
    "first_pass_grad_norm": sam_state.first_pass_grad_norm if sam_state else missing,
    "perturbation_norm": sam_state.perturbation_norm if sam_state else missing,
    **_observed_metrics(settings, first.outputs, loss_rng),
  }
  model_state = first.outputs.model_state
  if due is not None and due is not True:
    # Between perturbations the pass at w_adv is the only one: what the
    # first pass would report (and the BatchNorm statistics) comes from it.
    (only,) = second_passes
    only_metrics = {
      **_observed_metrics(settings, only.outputs, loss_rng),
      "first_pass_loss": _loss_mean(settings.perturbation_loss, only.outputs, loss_rng),
    }
    if due is False:
      metrics.update(only_metrics)
      model_state = only.outputs.model_state
    else:
      metrics.update({name: jnp.where(due, metrics[name], value) for name, value in only_metrics.items()})
      model_state = jax.lax.cond(due, lambda: first.outputs.model_state, lambda: only.outputs.model_state)
  # The gradient at w_adv is checked through its norm, which is non-finite when it is.
  finite = all_finite(first.grads) & (jnp.isfinite(metrics["grad_norm"]) | (sam_state is None))
  return _Update(updates, model_state, opt_state, metrics, finite)


def _plain_update(settings: _StepSettings, state: TrainState, batch, forward, loss_rng) -> _Update:
  """One pass on `loss`; the perturbation loss is reported, not differentiated."""
  only = _run_pass(settings, state.params, batch, forward, settings.loss, over_devices=True)
  updates, opt_state = settings.tx.update(only.grads, state.opt_state, state.params)
  metrics = {
    "first_pass_loss": _loss_mean(settings.perturbation_loss, only.outputs, loss_rng),
    "loss_at_w_adv": only.value,
    "grad_norm": global_norm(only.grads),
    "first_pass_grad_norm": jnp.zeros([]),
    "perturbation_norm": jnp.zeros([]),
    **_observed_metrics(settings, only.outputs, loss_rng),
  }
  return _Update(updates, only.outputs.model_state, opt_state, metrics, all_finite(only.grads))


def _step_keys(settings: _StepSettings, state: TrainState) -> tuple[jax.Array, jax.Array]:
  """The step's model key (dropout: the same in both passes) and loss key."""
  rng = jax.random.fold_in(state.rng, state.step)
  if settings.axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(settings.axis_name))
  model_rng, loss_rng = jax.random.split(rng)
  return model_rng, loss_rng


def _train_step(settings: _StepSettings, state: TrainState, batch) -> tuple[TrainState, Metrics]:
  """One step of :func:`make_train_step`: the update, the non-finite guard, the metrics."""
  model_rng, loss_rng = _step_keys(settings, state)

  def forward(params, batch, index) -> LossInputs:
    """Training-mode outputs of micro-batch `index` (the same key in both passes)."""
    rng = jax.random.fold_in(model_rng, index)
    return _checked_loss_inputs(
      "make_train_step", settings.model_fn(params, state.model_state, batch, train=True, rng=rng)
    )

  if _calls_grad_fn(settings.tx, state.opt_state, state.params):
    update = _sharpness_aware_update(settings, state, batch, forward, loss_rng)
  elif settings.perturbation_batch_fraction != 1:
    raise ValueError(
      f"make_train_step: perturbation_batch_fraction={settings.perturbation_batch_fraction} needs a"
      " sharpness-aware tx (aace_sam, sam); this tx takes one pass."
    )
  else:
    update = _plain_update(settings, state, batch, forward, loss_rng)
  metrics = dict(update.metrics, param_norm=global_norm(state.params))
  learning_rate = _learning_rate(update.opt_state)
  if learning_rate is not None:
    metrics["learning_rate"] = learning_rate
  new = (
    optax.apply_updates(state.params, update.updates),
    _average(update.model_state, settings.axis_name),
    update.opt_state,
  )
  finite = update.finite
  if settings.skip_nonfinite:
    # A finite gradient can still give a non-finite state (a NaN learning
    # rate, BatchNorm statistics overflowing on a huge input).
    finite = finite & all_finite(new)
    if settings.axis_name is not None:  # every replica must take the same decision
      finite = jax.lax.pmin(finite.astype(jnp.int32), settings.axis_name) > 0
    # One conditional, not a select per leaf: thousands of selects sharing
    # one predicate made XLA's fusion pass grow with the cube of the depth
    # (PyramidNet at depth 38: 118 s to compile against 16 s this way).
    new = jax.lax.cond(finite, lambda: new, lambda: (state.params, state.model_state, state.opt_state))
  metrics["skipped_steps"] = 1 - finite.astype(jnp.float32) if settings.skip_nonfinite else jnp.zeros([])
  params, model_state, opt_state = new
  new_state = state._replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state)
  metrics = _average({k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}, settings.axis_name)
  return new_state, StepMetrics(metrics)


def make_train_step(
  apply_fn: Optional[ApplyFn] = None,
  tx: Optional[optax.GradientTransformation] = None,
  *,
  logits_fn: Optional[LogitsFn] = None,
  perturbation_loss: PerExampleLoss = _losses.aace_cross_entropy,
  loss: PerExampleLoss = _losses.cross_entropy,
  axis_name: Optional[str] = None,
  sync_perturbation: bool = True,
  grad_accum_steps: int = 1,
  perturbation_batch_fraction: float = 1.0,
  new_perturbation: Optional[bool] = None,
  conditional_first_pass: Optional[bool] = None,
  skip_nonfinite: bool = True,
  extra_metrics: Optional[dict[str, PerExampleLoss]] = None,
) -> Step:
  r"""Builds a pure training step for SGD, SAM or AACE-SAM.

  With ``tx`` a sharpness-aware transformation (:func:`aace_sam`,
  :func:`sam`, or one that contains them, as in ``optax.chain`` or
  ``optax.inject_hyperparams``):

  1. first pass at :math:`w`: logits, the batch mean of ``perturbation_loss``
     and its gradient; the model state (BatchNorm running statistics) comes
     from this pass and no other;
  2. ``tx`` perturbs :math:`w` and calls back for the gradient of the batch
     mean of ``loss`` at :math:`w_{adv}`: the second pass normalizes with the
     batch's statistics and its new running statistics are discarded;
  3. ``tx``'s update is applied at :math:`w`.

  Any model and loss: ``logits_fn=`` instead of ``apply_fn`` takes a batch
  of any structure (every array with a leading example axis) and returns
  :class:`LossInputs`: logits of shape ``[..., C]``, one integer target per
  prediction (a token, a pixel), and optionally a weight per target, such
  as a padding mask. Both losses are then weighted means,
  :math:`\sum_i w_i \ell_i / \sum_i w_i`, the sums taken over the whole
  batch: over every micro-batch and, for the gradients averaged across
  devices, every device's batch, so that padding in one part of the batch
  does not reweigh the others. The metrics are each device's weighted batch
  means, averaged over the devices. Soft targets (a distribution over the
  classes, as mixup makes) are refused: AACE's :math:`q` is built around
  one true class per prediction.

  With any other optax transformation the step is plain one-pass training on
  ``loss``. ``perturbation_loss=cross_entropy`` with ``tx=sam(...)`` is
  classic SAM. A loss that takes ``key`` (``aace_cross_entropy``) receives a
  fresh key each step, for its ``"rand"`` mode.

  Data parallel (``axis_name`` set, the step run under ``jax.pmap`` or
  ``jax.shard_map`` with that axis): the final gradient, the metrics and the
  new model state are averaged over the axis. ``sync_perturbation=True``
  averages the first-pass gradient too, so the step equals one step on the
  global batch; ``False`` keeps each device's perturbation local (SAM's
  m-sharpness, with m the per-device batch). Averaging BatchNorm statistics
  after the step keeps the replicas identical; each device still normalizes
  with its own batch statistics during the step. Give ``tx`` no
  ``batch_axis_name`` of its own here: the step does the averaging.

  Gradient accumulation (``grad_accum_steps=k``) splits each (per-device)
  batch into k micro-batches and averages over them both the perturbation
  gradient and the training-loss gradient at :math:`w_{adv}`: the perturbation
  is computed once, from the whole batch, exactly as for a k-times larger
  batch without BatchNorm (BatchNorm normalizes each micro-batch on its own;
  the new running statistics are the mean of the micro-batches').

  Cheaper steps. With ``tx`` perturbing every ``k > 1`` updates
  (``aace_sam(..., perturb_every=k)``), the first pass runs only on the steps
  that compute a new perturbation: a ``jax.lax.cond`` leaves it out of the
  others, which take one pass, at :math:`w + e` with the kept perturbation
  (or at :math:`w`, ``reuse_perturbation=False``). That pass is then the
  only one, so the BatchNorm statistics and the metrics ``loss``,
  ``accuracy`` and ``first_pass_loss`` come from it; the running
  statistics would otherwise be updated only every k-th step.
  ``perturbation_batch_fraction=f`` computes the perturbation gradient from
  the first ``round(f * b)`` examples of each (per-device) batch of ``b``
  and the gradient at :math:`w_{adv}` from all ``b``: ``1 + f`` passes. The
  BatchNorm statistics, ``loss`` and ``accuracy`` are then those of the
  first pass's examples. ``k = 1`` and ``f = 1`` are the step above, bit for
  bit. A skipped non-finite step (below) does not advance the k-cycle.
  Compile such a step with :meth:`Step.jit` (or :func:`shard_step`,
  :func:`pmap_step`): the :class:`CompiledStep` they return holds the update
  that perturbs anew and the update between as two programs with no
  conditional, and runs the one the state's counter asks for. ``jax.jit``
  of the step compiles one program for both: its first pass sits in a
  ``jax.lax.cond`` where ``conditional_first_pass`` (default: everywhere but
  on a CPU), and otherwise runs on every update, its results kept where they
  are due (XLA's CPU backend runs backward convolutions inside a conditional
  several times slower than outside one, so the pass costs less run than
  skipped). ``new_perturbation=True`` / ``False`` builds a step that always /
  never computes a new perturbation, with no conditional, for a caller that
  picks one itself.

  Non-finite steps (``skip_nonfinite``): if the perturbation gradient, the
  final gradient, or the state the step would produce (parameters, optimizer
  state, model state such as BatchNorm statistics) has a NaN or an infinity
  (on any device), the step keeps
  the parameters, model state and optimizer state as they were, still
  advances ``step`` (so the data moves on), and reports ``skipped_steps=1``.

  Dropout (a model that draws from ``rng``): both passes of a step, and
  each micro-batch's two passes, use the same key, folded from
  ``state.rng``, the step number, the device index and the micro-batch
  index, so the perturbation and the update see the same network; the next
  step draws a new one.

  ``tx`` calls ``grad_fn(params)``, which returns ``(loss, gradient)`` at
  those parameters, at most once (``aace_sam``, ``sam``, and ``optax.chain``
  or ``optax.inject_hyperparams`` around them); the loss and gradient norm at
  :math:`w_{adv}` are read from its :class:`SAMState`, so no third pass
  runs. ``optax.MultiSteps`` is refused: use
  ``grad_accum_steps``.

  Args:
    apply_fn: an image classifier, ``apply_fn(params, model_state, images,
      *, train, rng) -> (logits, new_model_state)`` for a batch
      ``{"image", "label"}``; :func:`linen_apply_fn` adapts a Flax Linen
      module.
    tx: the optax transformation.
    logits_fn: instead of ``apply_fn``, any model and batch:
      ``logits_fn(params, model_state, batch, *, train, rng) ->``
      :class:`LossInputs`.
    perturbation_loss: per-example loss of the first pass.
    loss: per-example training loss of the second pass (of the only pass for
      a plain optimizer).
    axis_name: the mapped axis for data parallelism, or None on one device.
    sync_perturbation: average the first-pass gradient over ``axis_name``.
    grad_accum_steps: micro-batches per step, dividing the per-device batch
      (and its first-pass part).
    perturbation_batch_fraction: the part of each batch, in (0, 1], the
      first pass takes (its leading examples), for a sharpness-aware ``tx``.
    new_perturbation: None: ``tx``'s state decides on the device whether a
      step computes a new perturbation; True / False: this step always /
      never does (its ``tx`` perturbing every ``k > 1`` updates), and the
      caller runs the ``True`` step every k-th step.
    conditional_first_pass: for the one-program form of a ``tx`` perturbing
      every ``k > 1`` updates, put the first pass in a ``jax.lax.cond``
      (True) or run it every update and keep its results where due
      (False); None: False on a CPU, True elsewhere.
    skip_nonfinite: skip updates whose gradients or results are not finite.
    extra_metrics: per-example functions ``fn(logits, labels)`` reported as
      batch means under their names, computed from the first pass's logits
      (no extra pass, not differentiated); for example
      ``{"aace_kl": aace_kl_divergence}``, the value the authors log.

  Returns:
    A :class:`Step` (compile it with :meth:`Step.jit`, ``jax.jit`` or a
    parallel wrapper), ``step(state, batch) -> (state, metrics)`` with
    ``batch = {"image", "label"}`` (or ``logits_fn``'s). ``metrics`` holds
    float32 batch means (weighted, with ``logits_fn``'s weights):

    - ``loss``: ``loss`` at :math:`w`, from the first pass's logits (see
      "Cheaper steps" for which pass and examples when there is no first
      pass or it takes part of the batch);
    - ``accuracy``: of the same logits;
    - ``first_pass_loss``: ``perturbation_loss`` at :math:`w`, the loss the
      perturbation is built from;
    - ``loss_at_w_adv``: ``loss`` at :math:`w_{adv}`, the pass whose
      gradient updates the weights (equal to ``loss`` for a plain optimizer);
    - ``first_pass_grad_norm``: the norm of the gradient the perturbation
      is built from (between perturbations, the kept perturbation's);
      ``perturbation_norm``: :math:`\|w_{adv} - w\|` applied (both 0 for a
      plain optimizer; the latter 0 on plain steps between perturbations);
    - ``grad_norm``: the norm of the gradient given to the optimizer;
    - ``param_norm``: :math:`\|w\|` before the update, the scale against
      which ``perturbation_norm`` reads;
    - ``skipped_steps``: 1 when the update was skipped;
    - ``learning_rate`` when ``tx`` injects one, and one entry per
      ``extra_metrics`` name.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import aace_jax
    >>> def apply_fn(params, model_state, images, *, train, rng):
    ...   return images @ params["w"], model_state
    >>> tx = aace_jax.aace_sam(optax.sgd(0.5), rho=0.2)
    >>> state = aace_jax.TrainState.create(params={"w": jnp.zeros((2, 2))}, tx=tx, rng=jax.random.key(0))
    >>> batch = {"image": jnp.array([[1.0, 0.0], [0.0, 1.0]]), "label": jnp.array([0, 1])}
    >>> step = jax.jit(aace_jax.make_train_step(apply_fn, tx))
    >>> for _ in range(20):
    ...   state, metrics = step(state, batch)
    >>> print(int(state.step), float(metrics["accuracy"]), bool(metrics["loss_at_w_adv"] < 0.5))
    20 1.0 True

  References:
    Ratchatorn and Tanaka, `Adaptive Adversarial Cross-Entropy Loss for
    Sharpness-Aware Minimization <https://arxiv.org/abs/2406.14329>`_,
    ICIP 2024.
  """
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    raise TypeError(f"make_train_step: tx must be an optax transformation (init, update), got {tx!r}.")
  model_fn = _one_model_fn("make_train_step", apply_fn, logits_fn)
  _checks.check_bool("make_train_step", "sync_perturbation", sync_perturbation)
  _checks.check_bool("make_train_step", "skip_nonfinite", skip_nonfinite)
  _checks.check_bool("make_train_step", "new_perturbation", new_perturbation, allow_none=True)
  _checks.check_bool("make_train_step", "conditional_first_pass", conditional_first_pass, allow_none=True)
  _checks.check_positive_int("make_train_step", "grad_accum_steps", grad_accum_steps)
  _checks.check_fraction("make_train_step", "perturbation_batch_fraction", perturbation_batch_fraction)
  _checks.check_optional_str("make_train_step", "axis_name", axis_name)
  extra_metrics = dict(extra_metrics or {})
  if set(STEP_METRICS) & set(extra_metrics):
    raise ValueError(
      f"make_train_step: extra_metrics may not reuse the names {sorted(set(STEP_METRICS) & set(extra_metrics))}."
    )
  settings = _StepSettings(
    model_fn=model_fn,
    tx=optax.with_extra_args_support(tx),
    perturbation_loss=perturbation_loss,
    loss=loss,
    axis_name=axis_name,
    sync_perturbation=sync_perturbation,
    grad_accum_steps=grad_accum_steps,
    perturbation_batch_fraction=perturbation_batch_fraction,
    new_perturbation=new_perturbation,
    conditional_first_pass=jax.default_backend() != "cpu" if conditional_first_pass is None else conditional_first_pass,
    skip_nonfinite=skip_nonfinite,
    extra_metrics=extra_metrics,
  )

  def with_new_perturbation(due: bool) -> Step:
    fixed = dataclasses.replace(settings, new_perturbation=due)
    return Step(functools.partial(_train_step, fixed), axis_name=axis_name, returns_state=True)

  return Step(
    functools.partial(_train_step, settings),
    axis_name=axis_name,
    returns_state=True,
    with_new_perturbation=with_new_perturbation if new_perturbation is None else None,
  )


def make_eval_step(
  apply_fn: Optional[ApplyFn] = None,
  *,
  logits_fn: Optional[LogitsFn] = None,
  loss: PerExampleLoss = _losses.cross_entropy,
  axis_name: Optional[str] = None,
) -> Step:
  """Builds a pure evaluation step: summed loss and correct count of a batch.

  ``batch["mask"]`` (optional, 1 for real examples, 0 for padding) lets the
  last, padded batch of a dataset count exactly; with ``logits_fn`` its
  weights do. Sums, not means, are returned so the host adds batches without
  weighting; under ``axis_name`` they are summed over devices.

  Args:
    apply_fn: as for :func:`make_train_step`; called with ``train=False``.
    logits_fn: instead of ``apply_fn``, as for :func:`make_train_step`.
    loss: per-example loss.
    axis_name: the mapped axis, or None on one device.

  Returns:
    A :class:`Step` that returns no state, ``eval_step(state, batch) ->
    {"loss_sum", "correct", "count"}``, float32: sums over the targets,
    weighted.
  """
  model_fn = _one_model_fn("make_eval_step", apply_fn, logits_fn, mask_key="mask")

  def eval_step(state: TrainState, batch) -> Metrics:
    outputs = _checked_loss_inputs(
      "make_eval_step", model_fn(state.params, state.model_state, batch, train=False, rng=state.rng)
    )
    logits, targets = outputs.logits, outputs.targets
    weights = jnp.ones(targets.shape, jnp.float32) if outputs.weights is None else outputs.weights
    # Padding rows may carry any label (set to 0 above); zero their loss before it can be NaN.
    safe_loss = jnp.where(weights > 0, loss(logits, targets), 0)
    metrics = {
      "loss_sum": jnp.sum(safe_loss.astype(jnp.float32) * weights),
      "correct": jnp.sum((jnp.argmax(logits, -1) == targets) * weights),
      "count": jnp.sum(weights),
    }
    return metrics if axis_name is None else jax.lax.psum(metrics, axis_name)

  return Step(eval_step, axis_name=axis_name, returns_state=False)
