"""Flax NNX models in the pure step, and in `nnx.Optimizer`, with no split/merge glue.

Flax is not a dependency of the library: it is imported when these functions
are called. Two routes give the same training:

- `nnx_split` + `nnx_apply_fn`: the model becomes pytrees and an `ApplyFn`,
  and `make_train_step` does the rest (one compiled step, `pmap_step`,
  `shard_step`, gradient accumulation, skipped non-finite steps).
- `nnx_sharpness_aware_grads`: inside an `nnx.jit` step of your own, the
  first-pass gradient and the `grad_fn` that `nnx.Optimizer.update(model,
  grads, grad_fn=...)` hands to `aace_sam` or `sam`.

In both, the BatchNorm statistics (and every other non-parameter variable)
come from the first pass, and the second pass uses the first pass's dropout
mask.
"""

from typing import Any
from typing import Callable
from typing import Optional

import jax


def _nnx():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  return nnx


def nnx_split(model, *, wrt: Any = None) -> tuple[Any, Any, Any]:
  """Splits an NNX model into its graph, its parameters and the rest, as plain arrays.

  Args:
    model: a ``flax.nnx.Module``.
    wrt: the filter of the trainable variables; ``nnx.Param`` by default.

  Returns:
    ``(graphdef, params, model_state)``: ``params`` (the ``wrt`` variables)
    and ``model_state`` (every other variable: BatchNorm statistics, RNG
    streams, ...) are ``nnx.State`` trees of arrays, ready for
    :meth:`TrainState.create`; ``nnx.update(model, params, model_state)``
    writes a trained state back into ``model``.

  Example:
    >>> import jax, optax
    >>> from flax import nnx
    >>> import aace_jax
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.BatchNorm(8, rngs=nnx.Rngs(0)))
    >>> graphdef, params, model_state = aace_jax.nnx_split(model)
    >>> sorted(model_state["layers"][1])
    ['mean', 'var']
  """
  nnx = _nnx()
  wrt = nnx.Param if wrt is None else wrt
  graphdef, params, model_state = nnx.split(model, wrt, ...)
  return graphdef, nnx.as_pure(params), nnx.as_pure(model_state)


def _stream_tags(model) -> list[str]:
  nnx = _nnx()
  return sorted({variable.tag for _, variable in nnx.iter_graph(model) if isinstance(variable, nnx.RngKey)})


def nnx_apply_fn(graphdef, *, wrt: Any = None):
  """Adapts an NNX model, split by :func:`nnx_split`, to :class:`ApplyFn`.

  ``apply_fn(params, model_state, images, *, train, rng)`` rebuilds the model
  from ``graphdef`` (a copy: nothing outside is mutated), puts it in training
  or evaluation mode (``model.train()`` / ``model.eval()``, which set
  ``nnx.Dropout``'s ``deterministic`` and ``nnx.BatchNorm``'s
  ``use_running_average``), calls it on ``images`` and returns the logits
  with the new non-parameter state. In training, when ``rng`` is given,
  every RNG stream of the model is reseeded from it (one key per stream
  name), so the dropout mask is a function of the key the step hands over:
  :func:`make_train_step` gives both passes of a step the same one.

  Args:
    graphdef: the first output of :func:`nnx_split`.
    wrt: the filter :func:`nnx_split` was given.

  Returns:
    An :class:`ApplyFn` for :func:`make_train_step` and :func:`make_eval_step`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import aace_jax
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.dense, self.norm = nnx.Linear(4, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
    ...     self.drop, self.head = nnx.Dropout(0.1, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.head(self.drop(nnx.relu(self.norm(self.dense(x)))))
    >>> model = Net(nnx.Rngs(0))
    >>> graphdef, params, model_state = aace_jax.nnx_split(model)
    >>> tx = aace_jax.aace_sam(optax.sgd(0.1, momentum=0.9), rho=0.2)
    >>> state = aace_jax.TrainState.create(params=params, model_state=model_state, tx=tx, rng=jax.random.key(1))
    >>> step = jax.jit(aace_jax.make_train_step(aace_jax.nnx_apply_fn(graphdef), tx))
    >>> images = jax.random.normal(jax.random.key(2), (64, 4))
    >>> batch = {"image": images, "label": jnp.argmax(images[:, :3], -1)}
    >>> for _ in range(30):
    ...   state, metrics = step(state, batch)
    >>> nnx.update(model, state.params, state.model_state)
    >>> bool(metrics["accuracy"] > 0.8)
    True
  """
  nnx = _nnx()
  wrt = nnx.Param if wrt is None else wrt

  def apply_fn(params, model_state, images, *, train: bool, rng: Optional[jax.Array]):
    model = nnx.merge(graphdef, params, model_state, copy=True)
    if not train:
      model.eval()
      return model(images), model_state
    model.train()
    if rng is not None:
      tags = _stream_tags(model)
      nnx.reseed(model, **{tag: jax.random.fold_in(rng, index) for index, tag in enumerate(tags)})
    logits = model(images)
    _, _, new_model_state = nnx.split(model, wrt, ...)
    return logits, nnx.as_pure(new_model_state)

  return apply_fn


def nnx_sharpness_aware_grads(
  model,
  perturbation_loss_fn: Callable[[Any], jax.Array],
  loss_fn: Callable[[Any], jax.Array],
  *,
  wrt: Any = None,
) -> tuple[Any, Callable[[Any], tuple[jax.Array, Any]]]:
  r"""The first pass of a SAM/AACE-SAM step on an NNX model, and the ``grad_fn`` of the second.

  For ``nnx.Optimizer(model, aace_sam(...), wrt=wrt)`` inside an ``nnx.jit``
  step: ``perturbation_loss_fn(model)`` is differentiated at the model's
  parameters :math:`w`, and its non-parameter variables (BatchNorm
  statistics, RNG counters) are updated in place, as by any training pass.
  The returned ``grad_fn`` evaluates ``loss_fn`` on a copy of the model as it
  was *before* that pass, with the parameters the optimizer hands it
  (:math:`w_{adv}`): the same dropout mask as the first pass, and the copy's
  BatchNorm updates are discarded. It returns ``(loss, gradient)``, so the
  loss at :math:`w_{adv}` lands in :attr:`SAMState.loss_at_w_adv` with no
  third pass.

  Call it before anything else touches the model in the step.

  Args:
    model: a ``flax.nnx.Module`` in training mode.
    perturbation_loss_fn: ``model -> scalar``, the batch mean of the
      perturbation loss (AACE for ``aace_sam``, cross-entropy for ``sam``).
    loss_fn: ``model -> scalar``, the batch mean of the training loss.
    wrt: the optimizer's ``wrt`` filter; ``nnx.Param`` by default.

  Returns:
    ``(grads, grad_fn)`` for ``optimizer.update(model, grads, grad_fn=grad_fn)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import aace_jax
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    >>> optimizer = nnx.Optimizer(model, aace_jax.aace_sam(optax.sgd(0.1), rho=0.2), wrt=nnx.Param)
    >>> x = jax.random.normal(jax.random.key(2), (64, 4))
    >>> y = jnp.argmax(x[:, :3], -1)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   grads, grad_fn = aace_jax.nnx_sharpness_aware_grads(
    ...       model,
    ...       lambda m: aace_jax.aace_cross_entropy(m(x), y).mean(),
    ...       lambda m: aace_jax.cross_entropy(m(x), y).mean())
    ...   optimizer.update(model, grads, grad_fn=grad_fn)
    >>> for _ in range(50):
    ...   train_step(model, optimizer, x, y)
    >>> bool(aace_jax.cross_entropy(model(x), y).mean() < 0.5)
    True

  References:
    Ratchatorn and Tanaka, `Adaptive Adversarial Cross-Entropy Loss for
    Sharpness-Aware Minimization <https://arxiv.org/abs/2406.14329>`_,
    ICIP 2024.
  """
  nnx = _nnx()
  wrt = nnx.Param if wrt is None else wrt
  graphdef, _, before = nnx.split(model, wrt, ...)
  before = nnx.as_pure(before)  # arrays: the first pass below cannot change this snapshot
  grads = nnx.grad(perturbation_loss_fn, argnums=nnx.DiffState(0, wrt))(model)

  def grad_fn(perturbed_params):
    copy = nnx.merge(graphdef, perturbed_params, before, copy=True)
    value, perturbed_grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(copy)
    return value, nnx.as_pure(nnx.state(perturbed_grads, wrt))

  return grads, grad_fn
