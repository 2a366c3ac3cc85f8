"""Data-parallel wrappers for the steps of `_train_step.py`.

The step itself is written once; parallelism is applied where it is wrapped.
`pmap_train_step` is the classic per-device form (replicated state with a
leading device axis); `shard_train_step` is `jax.jit` over `jax.shard_map`, the
form that scales from one GPU to a multi-host pod with global arrays.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _check_axis(owner: str, step: Callable, axis: str) -> None:
  built_for = getattr(step, "axis_name", axis)
  if built_for != axis:
    raise ValueError(
        f"{owner}: the step averages over axis_name={built_for!r} but is mapped over"
        f" {axis!r}; build it with make_train_step(..., axis_name={axis!r})."
    )


def pmap_train_step(step: Callable, axis_name: str = "batch") -> Callable:
  """Maps a step over local devices with ``jax.pmap``, donating the state.

  Args:
    step: from :func:`make_train_step` or :func:`make_eval_step`, built with
      the same ``axis_name``.
    axis_name: the pmap axis.

  Returns:
    The pmapped step. Its state has a leading device axis (see
    :func:`replicate`); the batch's leading axis is ``[devices, per_device]``.
    An eval step keeps the state (it is not donated).
  """
  _check_axis("pmap_train_step", step, axis_name)
  donate = (0,) if getattr(step, "returns_state", True) else ()
  return jax.pmap(step, axis_name=axis_name, donate_argnums=donate)


def shard_train_step(step: Callable, mesh: Mesh, data_axis: str = "data") -> Callable:
  """Runs a step data-parallel over `mesh` with ``jax.jit`` and ``jax.shard_map``.

  The state is replicated over the mesh, the batch is split along its leading
  axis over ``data_axis`` (pass global arrays, or host arrays on one process),
  and the state's buffers are donated (arrays laid out otherwise are placed
  with ``jax.device_put`` first). Inside, each device runs ``step`` on
  its shard exactly as under ``jax.pmap``; gradients are not summed
  implicitly (``check_vma=False``), the step averages them itself.

  Args:
    step: from :func:`make_train_step` or :func:`make_eval_step`, built with
      ``axis_name=data_axis``.
    mesh: a mesh with an axis named ``data_axis``.
    data_axis: the mesh axis the batch is split over.

  Returns:
    The jitted step, ``(state, batch) -> (state, metrics)`` (or ``metrics``).
  """
  if data_axis not in mesh.axis_names:
    raise ValueError(f"shard_train_step: mesh axes {mesh.axis_names} have no {data_axis!r}.")
  _check_axis("shard_train_step", step, data_axis)
  is_train = getattr(step, "returns_state", True)
  mapped = jax.shard_map(
      step,
      mesh=mesh,
      in_specs=(P(), P(data_axis)),
      out_specs=(P(), P()) if is_train else P(),
      check_vma=False,
  )
  compiled = jax.jit(mapped, donate_argnums=(0,) if is_train else ())
  replicated = NamedSharding(mesh, P())
  split = NamedSharding(mesh, P(data_axis))

  def run(state, batch):
    # No-ops for arrays already laid out this way (global arrays, the state
    # returned by the previous step); places host or single-device arrays.
    return compiled(jax.device_put(state, replicated), jax.device_put(batch, split))

  run.axis_name = data_axis
  return run


def replicate(tree, devices=None):
  """Copies a pytree to each local device, stacked on a leading device axis, for ``jax.pmap``."""
  devices = jax.local_devices() if devices is None else list(devices)
  sharding = NamedSharding(Mesh(np.array(devices), ("device",)), P("device"))
  return jax.tree.map(
      lambda x: jax.device_put(jnp.broadcast_to(x, (len(devices),) + jnp.shape(x)), sharding), tree
  )


def replicate_on_mesh(tree, mesh: Mesh):
  """Places a pytree that every process holds identically as arrays replicated over `mesh`.

  Works on one or many processes (``jax.device_put`` alone cannot target
  another host's devices); use it for the initial state of
  :func:`shard_train_step`.
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
