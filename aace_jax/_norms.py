"""Reductions over whole parameter trees, shared by the transformations and the train step.

On a lone CPU device the leaves are concatenated into vectors of at most
`CHUNK_LEAVES` leaves each, and each vector is reduced once: XLA's CPU
backend compiles every reduction as its own kernels, so a reduction per leaf
of a deep network's thousand leaves costs thousands of kernels per norm
(PyramidNet-272: 1,087 parameter leaves, 308 s to compile its AACE-SAM step
against 165 s), while one concatenation of all of them runs slowly (XLA CPU
copies each element through a search over the operands: 10.0 s per step of
that network at batch 8 against 6.0 s in chunks of 32 leaves;
benchmarks/RESULTS.md). Everywhere else each leaf is reduced where it lives
and the scalars are combined, as `optax.global_norm` does: on an accelerator
a concatenation costs memory and the kernels little, and over several
devices a concatenation of sharded leaves would gather the whole tree onto
every one.
"""

from typing import Optional

import jax
import jax.numpy as jnp

# Leaves per concatenated vector on a lone CPU device.
CHUNK_LEAVES = 32


def upcast(x: jax.Array) -> jax.Array:
  """`x` in at least float32 (float64 stays float64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def concatenates() -> bool:
  """Whether the reductions concatenate the leaves: on a lone CPU device (decided at trace time)."""
  return jax.default_backend() == "cpu" and jax.device_count() == 1


def _reduced_pieces(leaves, concatenate: Optional[bool]) -> list:
  """The leaves in at least float32, as vectors of `CHUNK_LEAVES` concatenated leaves or one by one."""
  if not (concatenates() if concatenate is None else concatenate):
    return [upcast(x) for x in leaves]
  dtype = jnp.result_type(*(upcast(x).dtype for x in leaves))
  chunks = [leaves[i : i + CHUNK_LEAVES] for i in range(0, len(leaves), CHUNK_LEAVES)]
  return [jnp.concatenate([jnp.ravel(x).astype(dtype) for x in chunk]) for chunk in chunks]


def global_norm(tree, *, concatenate: Optional[bool] = None) -> jax.Array:
  """The L2 norm of all the leaves of `tree` together, a float32 (or wider) scalar; 0 for an empty tree.

  `concatenate`: reduce vectors of concatenated leaves (True) or each leaf
  (False); None decides by `concatenates()`.
  """
  # Squares are summed in at least float32: bfloat16/float16 overflow or lose
  # the small terms of a large model's norm.
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros([], jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(piece)) for piece in _reduced_pieces(leaves, concatenate)))


def all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of `tree` is finite (integer leaves, counters, are)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(piece)) for piece in _reduced_pieces(leaves, None)]))
