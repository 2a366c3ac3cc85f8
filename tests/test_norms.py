"""Whole-tree reductions: values against NumPy, and how many reductions they take."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aace_jax._norms import all_finite
from aace_jax._norms import global_norm


def mixed_tree():
  rng = np.random.default_rng(0)
  return {
    "kernel": rng.normal(size=(3, 3, 4, 5)).astype(np.float32),
    "scale": rng.normal(size=(5,)).astype(jnp.bfloat16),
    "empty": np.zeros((0, 3), np.float32),
    "count": np.array(7, np.int32),
  }


def test_global_norm_is_the_norm_of_all_entries_in_float32():
  tree = mixed_tree()
  entries = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])
  norm = global_norm(tree)
  assert norm.dtype == jnp.float32
  np.testing.assert_allclose(norm, np.sqrt(np.sum(entries**2)), rtol=1e-6)
  # Summed in bfloat16 (8 significant bits), the ones would vanish beside the 256^2 terms.
  big_and_small = {"big": jnp.full((1000,), 256.0, jnp.bfloat16), "small": jnp.full((1000,), 1.0, jnp.bfloat16)}
  np.testing.assert_allclose(global_norm(big_and_small), np.sqrt(1000 * (256.0**2 + 1.0)), rtol=1e-6)
  assert float(global_norm({})) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_one_bad_entry_in_any_floating_leaf(bad):
  tree = mixed_tree()
  assert bool(all_finite(tree))
  for name in ("kernel", "scale"):
    spoiled = dict(tree)
    spoiled[name] = np.array(tree[name]).copy()
    spoiled[name].reshape(-1)[-1] = bad
    assert not bool(all_finite(spoiled)), name
  assert bool(all_finite({"count": np.array(2**31 - 1, np.int32)}))
  assert bool(all_finite({}))


def test_one_reduction_per_32_leaves_on_a_lone_cpu_device():
  # XLA compiles each reduction as a kernel of its own: a norm or a check per
  # leaf made a deep network's step thousands of kernels longer on a CPU, and
  # one concatenation of every leaf made its step slow (benchmarks/RESULTS.md).
  assert jax.default_backend() == "cpu" and jax.device_count() == 1  # where the suite runs
  for count, vectors in ((32, 1), (64, 2), (70, 3)):
    tree = [jnp.ones((i + 1, 3)) for i in range(count)]
    for fn in (global_norm, all_finite):
      primitives = [eqn.primitive.name for eqn in jax.make_jaxpr(fn)(tree).jaxpr.eqns]
      reductions = [p for p in primitives if p.startswith("reduce_")]
      concatenations = primitives.count("concatenate")
      assert concatenations == vectors and len(reductions) == vectors + (fn is all_finite), (fn.__name__, count)
    expected = np.sqrt(sum(3 * (i + 1) for i in range(count)))
    np.testing.assert_allclose(global_norm(tree), expected, rtol=1e-6)
    assert bool(all_finite(tree)) and not bool(all_finite([*tree[:-1], tree[-1].at[0, 0].set(jnp.nan)]))


def test_leaf_by_leaf_gives_the_same_norm_with_one_reduction_per_leaf():
  tree = mixed_tree()
  entries = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])
  np.testing.assert_allclose(global_norm(tree, concatenate=False), np.sqrt(np.sum(entries**2)), rtol=1e-6)
  leaves = [jnp.ones((i + 1, 3)) for i in range(5)]
  jaxpr = jax.make_jaxpr(lambda t: global_norm(t, concatenate=False))(leaves).jaxpr
  primitives = [eqn.primitive.name for eqn in jaxpr.eqns]
  assert primitives.count("reduce_sum") == 5 and "concatenate" not in primitives
