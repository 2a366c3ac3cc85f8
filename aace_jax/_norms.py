"""Reductions over whole parameter trees, shared by the transformations and the train step.

On a lone CPU device each is one reduction over the leaves concatenated into
a single vector: XLA's CPU backend compiles every reduction as its own
kernels, so per-leaf reductions over a deep network's thousand leaves cost
thousands of kernels per norm (PyramidNet-272: 1,087 parameter leaves), and
the concatenation is one kernel, at the price of one transient buffer the
size of the tree. Everywhere else each leaf is reduced where it lives and the
scalars are combined, as `optax.global_norm` does: on an accelerator the
buffer costs memory and the kernels little, and over several devices a
concatenation of sharded leaves would gather the whole tree onto every one.
"""

from typing import Optional

import jax
import jax.numpy as jnp


def upcast(x: jax.Array) -> jax.Array:
  """`x` in at least float32 (float64 stays float64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def concatenates() -> bool:
  """Whether the reductions concatenate the leaves: on a lone CPU device (decided at trace time)."""
  return jax.default_backend() == "cpu" and jax.device_count() == 1


def _flat(leaves) -> jax.Array:
  """The leaves raveled and concatenated, in at least float32."""
  dtype = jnp.result_type(*(upcast(x).dtype for x in leaves))
  return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])


def global_norm(tree, *, concatenate: Optional[bool] = None) -> jax.Array:
  """The L2 norm of all the leaves of `tree` together, a float32 (or wider) scalar; 0 for an empty tree.

  `concatenate`: one reduction over the concatenated leaves (True) or one per
  leaf (False); None decides by `concatenates()`.
  """
  # Squares are summed in at least float32: bfloat16/float16 overflow or lose
  # the small terms of a large model's norm.
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros([], jnp.float32)
  if concatenates() if concatenate is None else concatenate:
    return jnp.sqrt(jnp.sum(jnp.square(_flat(leaves))))
  return jnp.sqrt(sum(jnp.sum(jnp.square(upcast(x))) for x in leaves))


def all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of `tree` is finite (integer leaves, counters, are)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.array(True)
  if concatenates():
    return jnp.all(jnp.isfinite(_flat(leaves)))
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
