"""Data-parallel wrappers for the steps of `_train_step.py`.

The step is written once; parallelism is applied where it is wrapped.
`pmap_step` is the classic per-device form (replicated state with a leading
device axis); `shard_step` is `jax.jit` over `jax.shard_map`, the form that
scales from one GPU to a multi-host pod with global arrays. Both take a
`Step` (train or eval) and read its `axis_name` and `returns_state`.
"""

from typing import Callable
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aace_jax._train_step import CompiledStep
from aace_jax._train_step import Step


def _mapped_axis(owner: str, step: Step, axis: Optional[str]) -> str:
  """The axis to map over: `axis`, or the step's own; they must agree."""
  if not isinstance(step, Step):
    raise TypeError(
      f"{owner}: step must be an aace_jax.Step (make_train_step and make_eval_step return one),"
      f" got {step!r}; wrap a function of your own as Step(fn, axis_name=..., returns_state=...)."
    )
  if step.axis_name is None:
    raise ValueError(
      f"{owner}: the step was built with axis_name=None and would not average over devices;"
      " build it with make_train_step(..., axis_name=...)."
    )
  if axis is not None and axis != step.axis_name:
    raise ValueError(
      f"{owner}: the step averages over axis_name={step.axis_name!r} but is mapped over"
      f" {axis!r}; build it with make_train_step(..., axis_name={axis!r})."
    )
  return step.axis_name


def pmap_step(step: Step, axis_name: Optional[str] = None) -> Callable:
  """Maps a train or eval step over local devices with ``jax.pmap``.

  A train step's state is donated (its buffers are reused for the new
  state); an eval step's is kept.

  Args:
    step: a :class:`Step`, from :func:`make_train_step` or
      :func:`make_eval_step`, built with an ``axis_name``.
    axis_name: the pmap axis; defaults to the step's and must equal it.

  Returns:
    The pmapped step. Its state has a leading device axis (see
    :func:`replicate`); the batch's leading axis is ``[devices, per_device]``.
    A train step whose ``tx`` perturbs every ``k > 1`` updates is a
    :class:`CompiledStep` of two pmapped programs, picked on the host.
  """
  axis = _mapped_axis("pmap_step", step, axis_name)
  return _compiled(step, lambda step: jax.pmap(step.fn, axis_name=axis, donate_argnums=_donated(step)))


def _donated(step: Step) -> tuple:
  return (0,) if step.returns_state else ()


def _compiled(step: Step, compile: Callable[[Step], Callable]) -> Callable:
  """`compile(step)`, as a `CompiledStep` where the step may have a perturbation cycle to run as two programs."""
  return compile(step) if step.with_new_perturbation is None else CompiledStep(step, compile)


def shard_step(step: Step, mesh: Mesh, data_axis: Optional[str] = None, *, state_sharding=None) -> Callable:
  """Runs a train or eval step over `mesh`: data parallel, or with the parameters and optimizer state sharded.

  The batch is split along its leading axis over ``data_axis`` (pass global
  arrays, or host arrays on one process), and a train step's state buffers
  are donated (arrays laid out otherwise are placed with
  ``jax.device_put`` first). Two forms:

  - Replicated state (``state_sharding=None``, the step built with
    ``axis_name=data_axis``): ``jax.jit`` over ``jax.shard_map``. Each device
    holds the whole state and runs ``step`` on its shard of the batch
    exactly as under ``jax.pmap``; gradients are not summed implicitly
    (``check_vma=False``), the step averages them itself, and
    ``sync_perturbation=False`` gives each device its own perturbation
    (SAM's m-sharpness).
  - Sharded state (``state_sharding`` given, the step built with
    ``axis_name=None``): ``jax.jit`` of the step as written for one device,
    with the state laid out by ``state_sharding`` (FSDP: each parameter
    split over the ``data`` axis, see :func:`fsdp_sharding`; tensor
    parallel over a ``model`` axis; or both on a 2-D mesh) and kept in that
    layout from step to step. XLA partitions the program and adds only the
    collectives the layout needs: the model's own (an FSDP layer gathers its
    weights to compute), none in the transformation's update, whose norms
    and checks reduce each leaf where it lives. The step sees the global
    batch, so its perturbation is always the global batch's
    (``sync_perturbation`` has nothing to act on; per-device perturbations
    need the replicated form). The mesh's axes must be of type ``Auto``
    (``jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,) * n)``),
    so that XLA chooses the layout of every intermediate value.

  Args:
    step: a :class:`Step`, from :func:`make_train_step` or
      :func:`make_eval_step`: built with ``axis_name`` a mesh axis for a
      replicated state, with ``axis_name=None`` for a sharded one.
    mesh: a mesh with an axis named ``data_axis``.
    data_axis: the mesh axis the batch is split over; for a replicated state
      it defaults to the step's ``axis_name`` and must equal it; required for
      a sharded one.
    state_sharding: the layout of the state: a tree with the structure of
      the state (:class:`TrainState`) whose leaves are ``NamedSharding`` or
      ``PartitionSpec`` objects of `mesh`, e.g. ``fsdp_sharding(
      jax.eval_shape(make_state), mesh)``.

  Returns:
    The jitted step, ``(state, batch) -> (state, metrics)`` (or ``metrics``),
    metrics replicated; for a ``tx`` that perturbs every ``k > 1`` updates,
    a :class:`CompiledStep` of two such programs, picked on the host.

  Example:
    >>> import jax, jax.numpy as jnp, optax, aace_jax
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> def apply_fn(params, model_state, images, *, train, rng):
    ...   return images @ params["w"], model_state
    >>> tx = aace_jax.aace_sam(optax.sgd(0.5), rho=0.2)
    >>> make_state = lambda: aace_jax.TrainState.create(params={"w": jnp.zeros((8, 2))}, tx=tx, rng=jax.random.key(0))
    >>> sharding = aace_jax.fsdp_sharding(jax.eval_shape(make_state), mesh, min_size=0)
    >>> state = jax.jit(make_state, out_shardings=sharding)()
    >>> step = aace_jax.shard_step(aace_jax.make_train_step(apply_fn, tx), mesh, "data", state_sharding=sharding)
    >>> batch = {"image": jnp.eye(8), "label": jnp.arange(8) % 2}
    >>> state, metrics = step(state, batch)
    >>> state.params["w"].sharding.spec == jax.sharding.PartitionSpec("data", None)
    True
  """
  if state_sharding is not None:
    return _sharded_state_step(step, mesh, data_axis, state_sharding)
  if isinstance(step, Step) and step.axis_name is None:
    raise ValueError(
      "shard_step: the step was built with axis_name=None, which runs on a sharded state: give its layout,"
      " shard_step(..., state_sharding=...) (e.g. aace_jax.fsdp_sharding(...)); or, for a replicated state,"
      f" build the step with make_train_step(..., axis_name={data_axis or 'data'!r})."
    )
  axis = _mapped_axis("shard_step", step, data_axis)
  if axis not in mesh.axis_names:
    raise ValueError(f"shard_step: mesh axes {mesh.axis_names} have no {axis!r}.")
  replicated = NamedSharding(mesh, P())
  split = NamedSharding(mesh, P(axis))

  def compile(step: Step) -> Callable:
    out_specs = (P(), P()) if step.returns_state else P()
    mapped = jax.shard_map(step.fn, mesh=mesh, in_specs=(P(), P(axis)), out_specs=out_specs, check_vma=False)
    compiled = jax.jit(mapped, donate_argnums=_donated(step))

    def run(state, batch):
      # No-ops for arrays already laid out this way (global arrays, the state
      # returned by the previous step); places host or single-device arrays.
      return compiled(jax.device_put(state, replicated), jax.device_put(batch, split))

    return run

  return _compiled(step, compile)


def _sharded_state_step(step: Step, mesh: Mesh, data_axis: Optional[str], state_sharding) -> Callable:
  """`shard_step`'s sharded-state form: the one-device step jitted with the state and batch laid out over `mesh`."""
  if not isinstance(step, Step):
    raise TypeError(f"shard_step: step must be an aace_jax.Step, got {step!r}.")
  if step.axis_name is not None:
    raise ValueError(
      f"shard_step: a sharded state runs the step as written for one device, but this one averages over"
      f" axis_name={step.axis_name!r} (the replicated form); build it with axis_name=None."
    )
  if data_axis is None or data_axis not in mesh.axis_names:
    raise ValueError(
      f"shard_step: with state_sharding, data_axis must name the mesh axis the batch is split over,"
      f" one of {mesh.axis_names}; got {data_axis!r}."
    )
  explicit = [name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind == jax.sharding.AxisType.Explicit]
  if explicit:
    raise ValueError(
      f"shard_step: a sharded state needs mesh axes of type Auto, so that XLA lays out the values between"
      f" the state and the batch; {explicit} are Explicit. Make the mesh with"
      " jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names))."
    )
  is_layout = lambda x: isinstance(x, (NamedSharding, P))

  def named(layout):
    if isinstance(layout, P):
      return NamedSharding(mesh, layout)
    if not isinstance(layout, NamedSharding):
      raise TypeError(f"shard_step: state_sharding's leaves must be NamedShardings or PartitionSpecs, got {layout!r}.")
    return layout

  state_shardings = jax.tree.map(named, state_sharding, is_leaf=is_layout)
  replicated = NamedSharding(mesh, P())
  split = NamedSharding(mesh, P(data_axis))

  def compile(step: Step) -> Callable:
    compiled = jax.jit(
      step.fn,
      in_shardings=(state_shardings, split),
      out_shardings=(state_shardings, replicated) if step.returns_state else replicated,
      donate_argnums=_donated(step),
    )

    def run(state, batch):
      try:
        state = jax.device_put(state, state_shardings)
      except ValueError as error:
        raise ValueError(
          "shard_step: state_sharding does not fit the state:"
          f" {jax.tree.structure(state_shardings, is_leaf=is_layout)} against {jax.tree.structure(state)}."
        ) from error
      return compiled(state, jax.device_put(batch, split))

    return run

  return _compiled(step, compile)


def fsdp_sharding(tree, mesh: Mesh, axis: str = "data", *, min_size: int = 2**14):
  """A fully sharded (FSDP) layout of `tree` over one mesh axis: each large array split along one dimension.

  Each array of at least ``min_size`` elements is split along its largest
  dimension that the axis's size divides (the last such one on a tie), and
  replicated when none does; smaller arrays, scalars and PRNG keys are
  replicated. Use it for the parameters and optimizer state of
  :func:`shard_step`'s sharded form: the optimizer's momentum and a kept
  perturbation then lie where their parameters do.

  Args:
    tree: arrays or ``jax.ShapeDtypeStruct`` objects (``jax.eval_shape`` of the
      state's constructor: nothing is allocated).
    mesh: the device mesh.
    axis: the mesh axis to split over.
    min_size: arrays smaller than this stay replicated (splitting them saves
      little memory and costs a gather each).

  Returns:
    A tree of ``NamedSharding`` objects with the structure of `tree`.
  """
  if axis not in mesh.axis_names:
    raise ValueError(f"fsdp_sharding: mesh axes {mesh.axis_names} have no {axis!r}.")
  if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
    raise ValueError(f"fsdp_sharding: min_size must be a non-negative int, got {min_size!r}.")
  devices = mesh.shape[axis]

  def layout(x):
    shape = tuple(jnp.shape(x))
    candidates = [d for d in range(len(shape)) if shape[d] % devices == 0]  # none for a scalar
    is_key = jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
    if is_key or int(np.prod(shape)) < min_size or not candidates:
      return NamedSharding(mesh, P())
    dim = max(candidates, key=lambda d: (shape[d], d))
    return NamedSharding(mesh, P(*[axis if d == dim else None for d in range(len(shape))]))

  return jax.tree.map(layout, tree)


def replicate(tree, devices=None):
  """Copies a pytree to each local device, stacked on a leading device axis, for ``jax.pmap``."""
  devices = jax.local_devices() if devices is None else list(devices)
  sharding = NamedSharding(Mesh(np.array(devices), ("device",)), P("device"))
  return jax.tree.map(lambda x: jax.device_put(jnp.broadcast_to(x, (len(devices),) + jnp.shape(x)), sharding), tree)


def replicate_on_mesh(tree, mesh: Mesh):
  """Places a pytree that every process holds identically as arrays replicated over `mesh`.

  Works on one or many processes (``jax.device_put`` alone cannot target
  another host's devices); use it for the initial state of
  :func:`shard_step`.
  """
  sharding = NamedSharding(mesh, P())

  def place(x):
    if _is_key(x):
      return jax.random.wrap_key_data(place(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(place, tree)


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def unreplicate(tree):
  """The first device's copy of a pytree with a leading device axis."""
  return jax.tree.map(lambda x: x[0], tree)
