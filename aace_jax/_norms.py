"""Reductions over whole parameter trees, shared by the transformations and the train step.

Each is one reduction over the leaves concatenated into a single vector, not
one reduction per leaf. XLA compiles every reduction as its own kernel, so
per-leaf reductions over a deep network's thousand leaves cost thousands of
kernels per norm (PyramidNet-272: 1,087 parameter leaves); the concatenation
is one kernel and one reduction, at the price of one transient buffer the size
of the tree.
"""

import jax
import jax.numpy as jnp


def upcast(x: jax.Array) -> jax.Array:
  """`x` in at least float32 (float64 stays float64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _flat(leaves) -> jax.Array:
  """The leaves raveled and concatenated, in at least float32."""
  dtype = jnp.result_type(*(upcast(x).dtype for x in leaves))
  return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])


def global_norm(tree) -> jax.Array:
  """The L2 norm of all the leaves of `tree` together, a float32 (or wider) scalar; 0 for an empty tree."""
  # Squares are summed in at least float32: bfloat16/float16 overflow or lose
  # the small terms of a large model's norm.
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(jnp.sum(jnp.square(_flat(leaves)))) if leaves else jnp.zeros([], jnp.float32)


def all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of `tree` is finite (integer leaves, counters, are)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.isfinite(_flat(leaves))) if leaves else jnp.array(True)
