"""Bugs peers' SAM implementations shipped, each pinned here: rho = 0, NaN leaking from a branch not taken.

(ASAM's zero-initialized leaves, the third, is in test_sam.py beside the other ASAM tests.)
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aace_jax
from tests.helpers import BatchNormNet
from tests.helpers import make_batch
from tests.helpers import mlp_apply
from tests.helpers import mlp_params
from tests.helpers import without_keys

SHARPNESS_AWARE = {
  "aace_sam": (aace_jax.aace_sam, aace_jax.aace_cross_entropy),
  "sam": (aace_jax.sam, aace_jax.cross_entropy),
}


def base():
  return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))


def batchnorm_run(tx, perturbation_loss, steps, *, jit):
  model = BatchNormNet()
  batch = make_batch(n=32)
  variables = model.init(jax.random.key(0), batch["image"], train=False)
  state = aace_jax.TrainState.create(
    params=variables["params"], model_state={"batch_stats": variables["batch_stats"]}, tx=tx, rng=jax.random.key(0)
  )
  step = aace_jax.make_train_step(aace_jax.linen_apply_fn(model), tx, perturbation_loss=perturbation_loss)
  step = jax.jit(step) if jit else step
  for _ in range(steps):
    state, metrics = step(state, batch)
    assert metrics["skipped_steps"] == 0
  (momentum,) = [node.trace for node in aace_jax._sam.find_states(state.opt_state, optax.TraceState)]
  return {"params": state.params, "momentum": momentum, "model_state": state.model_state}


@pytest.mark.parametrize("method", SHARPNESS_AWARE)
def test_rho_zero_is_the_base_optimizer(method):
  """davda54/sam#80: rho = 0 must be the base optimizer: parameters, momentum and BatchNorm statistics.

  Run op by op (each operation compiled on its own, as the two runs share
  them) the trees are equal bit for bit. Jitted, the two steps are different
  programs that XLA fuses differently, and they agree to a float32 ulp.
  """
  make, perturbation_loss = SHARPNESS_AWARE[method]
  expected = batchnorm_run(base(), aace_jax.cross_entropy, 3, jit=False)
  got = batchnorm_run(make(base(), 0.0), perturbation_loss, 3, jit=False)
  chex.assert_trees_all_equal(got, expected)
  # The runs moved, and rho > 0 would have moved them elsewhere: the comparison can fail.
  initial = batchnorm_run(base(), aace_jax.cross_entropy, 0, jit=False)
  assert np.abs(expected["params"]["Dense_0"]["kernel"] - initial["params"]["Dense_0"]["kernel"]).max() > 1e-3
  perturbed = batchnorm_run(make(base(), 0.5), perturbation_loss, 3, jit=False)
  assert np.abs(perturbed["params"]["Dense_0"]["kernel"] - expected["params"]["Dense_0"]["kernel"]).max() > 1e-4

  expected = batchnorm_run(base(), aace_jax.cross_entropy, 5, jit=True)
  got = batchnorm_run(make(base(), 0.0), perturbation_loss, 5, jit=True)
  chex.assert_trees_all_close(got, expected, rtol=2.5e-7, atol=6e-8)


def run_one_step(tx, state, batch, **step_kwargs):
  step = jax.jit(aace_jax.make_train_step(mlp_apply, tx, **step_kwargs))
  new_state, metrics = step(state, batch)
  return new_state, metrics


@pytest.mark.parametrize("method", SHARPNESS_AWARE)
def test_a_nonfinite_value_the_guard_does_not_take_changes_nothing(method):
  """The guard chooses between the new and the old state: NaN in old values the step overwrites must not leak.

  optax's arithmetic select (`cond * a + (1 - cond) * b`) would give NaN * 0
  = NaN here; a conditional or a true select gives the new state.
  """
  make, perturbation_loss = SHARPNESS_AWARE[method]
  tx = make(optax.sgd(0.1, momentum=0.9), 0.2)
  clean = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  # The logged fields of SAMState are overwritten by every update: poison them.
  sam_state = clean.opt_state
  poisoned = clean._replace(
    opt_state=sam_state._replace(loss_at_w_adv=jnp.float32(jnp.nan), perturbation_norm=jnp.float32(jnp.inf))
  )
  batch = make_batch()
  expected, _ = run_one_step(tx, clean, batch, perturbation_loss=perturbation_loss)
  got, metrics = run_one_step(tx, poisoned, batch, perturbation_loss=perturbation_loss)
  assert metrics["skipped_steps"] == 0
  chex.assert_trees_all_equal(without_keys(got), without_keys(expected))
  assert np.isfinite(got.opt_state.loss_at_w_adv)


@pytest.mark.parametrize("host", [False, True])
def test_a_nonfinite_kept_perturbation_is_not_used_when_a_new_one_is_computed(host):
  """The reuse branch is not taken on a step that perturbs anew: NaN in the kept perturbation changes nothing."""
  tx = aace_jax.aace_sam(optax.sgd(0.1, momentum=0.9), 0.2, perturb_every=3)
  clean = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  poisoned = clean._replace(
    opt_state=clean.opt_state._replace(
      kept_perturbation=jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), clean.opt_state.kept_perturbation)
    )
  )
  batch = make_batch()
  kwargs = {"new_perturbation": True} if host else {}
  expected, _ = run_one_step(tx, clean, batch, **kwargs)
  got, metrics = run_one_step(tx, poisoned, batch, **kwargs)
  assert metrics["skipped_steps"] == 0
  chex.assert_trees_all_equal(without_keys(got), without_keys(expected))
  assert np.all(np.isfinite(got.params["w1"]))


def test_a_nonfinite_first_pass_gradient_is_not_used_between_perturbations():
  """Between perturbations the update ignores the gradient it receives: NaN there changes nothing."""
  tx = aace_jax.aace_sam(optax.sgd(0.1, momentum=0.9), 0.2, perturb_every=3)
  params = mlp_params()
  batch = make_batch()
  grad_fn = jax.value_and_grad(
    lambda w: aace_jax.cross_entropy(mlp_apply(w, {}, batch["image"], train=True, rng=None)[0], batch["label"]).mean()
  )
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
  finite = jax.tree.map(lambda w: jnp.full_like(w, 0.1), params)
  _, state = update(finite, tx.init(params), params)  # computes and keeps a perturbation
  assert int(state.steps_since_perturbation) == 1
  expected = update(finite, state, params)
  got = update(jax.tree.map(lambda w: jnp.full_like(w, jnp.nan), params), state, params)
  chex.assert_trees_all_equal(got, expected)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(got))
