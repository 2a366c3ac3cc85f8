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
  """
  axis = _mapped_axis("pmap_step", step, axis_name)
  return jax.pmap(step.fn, axis_name=axis, donate_argnums=(0,) if step.returns_state else ())


def shard_step(step: Step, mesh: Mesh, data_axis: Optional[str] = None) -> Callable:
  """Runs a train or eval step data-parallel over `mesh` with ``jax.jit`` and ``jax.shard_map``.

  The state is replicated over the mesh, the batch is split along its leading
  axis over ``data_axis`` (pass global arrays, or host arrays on one process),
  and a train step's state buffers are donated (arrays laid out otherwise are
  placed with ``jax.device_put`` first). Inside, each device runs ``step`` on
  its shard exactly as under ``jax.pmap``; gradients are not summed
  implicitly (``check_vma=False``), the step averages them itself.

  Args:
    step: a :class:`Step`, from :func:`make_train_step` or
      :func:`make_eval_step`, built with ``axis_name`` a mesh axis.
    mesh: a mesh with an axis named ``data_axis``.
    data_axis: the mesh axis the batch is split over; defaults to the step's
      ``axis_name`` and must equal it.

  Returns:
    The jitted step, ``(state, batch) -> (state, metrics)`` (or ``metrics``).
  """
  axis = _mapped_axis("shard_step", step, data_axis)
  if axis not in mesh.axis_names:
    raise ValueError(f"shard_step: mesh axes {mesh.axis_names} have no {axis!r}.")
  mapped = jax.shard_map(
    step.fn,
    mesh=mesh,
    in_specs=(P(), P(axis)),
    out_specs=(P(), P()) if step.returns_state else P(),
    check_vma=False,
  )
  compiled = jax.jit(mapped, donate_argnums=(0,) if step.returns_state else ())
  replicated = NamedSharding(mesh, P())
  split = NamedSharding(mesh, P(axis))

  def run(state, batch):
    # No-ops for arrays already laid out this way (global arrays, the state
    # returned by the previous step); places host or single-device arrays.
    return compiled(jax.device_put(state, replicated), jax.device_put(batch, split))

  return run


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
