"""Norms of parameter trees, shared by the transformations and the train step."""

import jax
import jax.numpy as jnp


def upcast(x: jax.Array) -> jax.Array:
  """`x` in at least float32 (float64 stays float64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def global_norm(tree) -> jax.Array:
  """The L2 norm of all the leaves of `tree` together, a float32 (or wider) scalar; 0 for an empty tree."""
  # Squares are summed in at least float32: bfloat16/float16 overflow or lose
  # the small terms of a large model's norm.
  squares = [jnp.sum(jnp.square(upcast(x))) for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(squares)) if squares else jnp.zeros([], jnp.float32)
