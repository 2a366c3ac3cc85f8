"""The single-device train and eval steps against hand-driven computations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aace_jax
from tests.helpers import BatchNormNet
from tests.helpers import first_pass_batch_stats
from tests.helpers import hand_step
from tests.helpers import make_batch
from tests.helpers import mlp_apply
from tests.helpers import mlp_params

METHODS = {
  "aace_sam": (lambda: aace_jax.aace_sam(optax.sgd(0.1, momentum=0.9), 0.2), aace_jax.aace_cross_entropy),
  "sam": (lambda: aace_jax.sam(optax.sgd(0.1, momentum=0.9), 0.05), aace_jax.cross_entropy),
}


@pytest.mark.parametrize("method", METHODS)
def test_step_equals_core_transformation_driven_by_hand(method):
  make_tx, perturbation_loss = METHODS[method]
  tx = make_tx()
  batch = make_batch()
  params = mlp_params()
  step = jax.jit(aace_jax.make_train_step(mlp_apply, tx, perturbation_loss=perturbation_loss))
  state = aace_jax.TrainState.create(params=params, tx=tx, rng=jax.random.key(0))
  expected, opt_state = params, tx.init(params)
  for _ in range(3):
    state, metrics = step(state, batch)
    expected, opt_state = hand_step(tx, expected, opt_state, batch, perturbation_loss)
  for k in expected:
    np.testing.assert_allclose(state.params[k], expected[k], rtol=1e-6, atol=1e-7)
  assert int(state.step) == 3
  assert np.abs(state.params["w1"] - params["w1"]).max() > 1e-3


def test_metrics_are_the_quantities_they_name():
  rho = 0.2
  tx = aace_jax.aace_sam(optax.sgd(0.1), rho)
  batch = make_batch()
  params = mlp_params()
  state = aace_jax.TrainState.create(params=params, tx=tx, rng=jax.random.key(0))
  _, metrics = jax.jit(aace_jax.make_train_step(mlp_apply, tx))(state, batch)

  logits = mlp_apply(params, {}, batch["image"], train=True, rng=None)[0]
  mean_loss = lambda p, fn: fn(mlp_apply(p, {}, batch["image"], train=True, rng=None)[0], batch["label"]).mean()
  g = jax.grad(mean_loss)(params, aace_jax.aace_cross_entropy)
  g_norm = np.sqrt(sum(np.sum(np.square(v)) for v in jax.tree.leaves(g)))
  w_adv = jax.tree.map(lambda w, gi: w - rho * gi, params, g)
  g2 = jax.grad(mean_loss)(w_adv, aace_jax.cross_entropy)
  expected = {
    "loss": mean_loss(params, aace_jax.cross_entropy),
    "first_pass_loss": mean_loss(params, aace_jax.aace_cross_entropy),
    "loss_at_w_adv": mean_loss(w_adv, aace_jax.cross_entropy),
    "accuracy": np.mean(np.argmax(logits, -1) == batch["label"]),
    "first_pass_grad_norm": g_norm,
    "perturbation_norm": rho * g_norm,
    "grad_norm": np.sqrt(sum(np.sum(np.square(v)) for v in jax.tree.leaves(g2))),
    "param_norm": np.sqrt(sum(np.sum(np.square(v)) for v in jax.tree.leaves(params))),  # w before the update
    "skipped_steps": 0.0,
  }
  assert set(expected) == set(metrics)
  for k, v in expected.items():
    np.testing.assert_allclose(metrics[k], v, rtol=1e-5, err_msg=k)
  assert metrics["loss_at_w_adv"] > metrics["loss"]  # the perturbation is adversarial


def test_plain_optimizer_is_one_pass_sgd_and_reports_learning_rate():
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(0.1, 0.0, 10))
  batch = make_batch()
  params = mlp_params()
  calls = []

  def counting_apply(*args, **kwargs):
    calls.append(1)
    return mlp_apply(*args, **kwargs)

  step = jax.jit(aace_jax.make_train_step(counting_apply, tx))
  state = aace_jax.TrainState.create(params=params, tx=tx, rng=jax.random.key(0))
  state, metrics = step(state, batch)
  state, metrics = step(state, batch)
  assert len(calls) == 1  # one forward pass, traced once
  mean_loss = lambda p: aace_jax.cross_entropy(
    mlp_apply(p, {}, batch["image"], train=True, rng=None)[0], batch["label"]
  ).mean()
  expected = params
  for lr in (0.1, 0.09):
    expected = jax.tree.map(lambda w, g, lr=lr: w - lr * g, expected, jax.grad(mean_loss)(expected))
  for k in expected:
    np.testing.assert_allclose(state.params[k], expected[k], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(metrics["learning_rate"], 0.09, rtol=1e-6)
  assert metrics["perturbation_norm"] == 0


def test_learning_rate_of_an_injected_optimizer_inside_an_injected_sam():
  # The documented form (docs/composition.md) for scheduling rho and the learning rate together.
  tx = optax.inject_hyperparams(aace_jax.aace_sam)(
    optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(0.3, 0.0, 3)), rho=0.1
  )
  state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  step = jax.jit(aace_jax.make_train_step(mlp_apply, tx))
  rates = []
  for _ in range(2):
    state, metrics = step(state, make_batch())
    rates.append(float(metrics["learning_rate"]))
  np.testing.assert_allclose(rates, [0.3, 0.2], rtol=1e-6)  # the rate each step used


def test_steps_carry_what_the_parallel_wrappers_read():
  train_step = aace_jax.make_train_step(mlp_apply, optax.sgd(0.1), axis_name="data")
  eval_step = aace_jax.make_eval_step(mlp_apply, axis_name="data")
  assert (train_step.axis_name, train_step.returns_state) == ("data", True)
  assert (eval_step.axis_name, eval_step.returns_state) == ("data", False)
  with pytest.raises(TypeError, match=r"must be an aace_jax.Step.*Step\(fn, axis_name="):
    aace_jax.pmap_step(lambda state, batch: batch, axis_name="data")
  with pytest.raises(ValueError, match="built with axis_name=None"):
    aace_jax.pmap_step(aace_jax.make_eval_step(mlp_apply))
  own = aace_jax.Step(lambda state, batch: {"n": jax.lax.psum(1.0, "data")}, axis_name="data", returns_state=False)
  out = aace_jax.pmap_step(own)(jnp.zeros((jax.local_device_count(),)), jnp.zeros((jax.local_device_count(), 2)))
  np.testing.assert_array_equal(out["n"], np.full(jax.local_device_count(), float(jax.local_device_count())))


def test_sharpness_aware_step_is_two_passes_traced_once_without_host_transfers():
  tx = aace_jax.aace_sam(optax.sgd(0.1), 0.2)
  calls = []

  def counting_apply(*args, **kwargs):
    calls.append(1)
    return mlp_apply(*args, **kwargs)

  step = jax.jit(aace_jax.make_train_step(counting_apply, tx), donate_argnums=0)
  state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  batch = jax.device_put(make_batch())
  state, _ = step(state, batch)
  assert len(calls) == 2
  with jax.transfer_guard("disallow"):
    for _ in range(3):
      state, metrics = step(state, batch)
  assert len(calls) == 2
  assert step._cache_size() == 1


def test_a_transformation_of_ones_own_that_calls_grad_fn_gets_both_passes():
  # Not aace_sam or sam (no SAMState): the step finds out by tracing its update.
  def init(params):
    return optax.EmptyState()

  def update(updates, state, params=None, *, grad_fn):
    _, grads_there = grad_fn(jax.tree.map(lambda w, g: w - 0.3 * g, params, updates))
    return jax.tree.map(lambda g: -0.1 * g, grads_there), state

  tx = optax.GradientTransformationExtraArgs(init, update)
  params, batch = mlp_params(), make_batch()
  state = aace_jax.TrainState.create(params=params, tx=tx, rng=jax.random.key(0))
  new_state, _ = jax.jit(aace_jax.make_train_step(mlp_apply, tx))(state, batch)

  mean_loss = lambda p, fn: fn(mlp_apply(p, {}, batch["image"], train=True, rng=None)[0], batch["label"]).mean()
  g = jax.grad(mean_loss)(params, aace_jax.aace_cross_entropy)
  g_there = jax.grad(mean_loss)(jax.tree.map(lambda w, gi: w - 0.3 * gi, params, g), aace_jax.cross_entropy)
  expected = jax.tree.map(lambda w, gi: w - 0.1 * gi, params, g_there)
  chex.assert_trees_all_close(new_state.params, expected, rtol=1e-6, atol=1e-7)


def test_batchnorm_statistics_come_from_the_first_pass_only():
  model = BatchNormNet()
  batch = make_batch()
  variables = model.init(jax.random.key(0), batch["image"], train=False)
  tx = aace_jax.aace_sam(optax.sgd(0.1), 0.5)
  state = aace_jax.TrainState.create(
    params=variables["params"], model_state={"batch_stats": variables["batch_stats"]}, tx=tx, rng=jax.random.key(0)
  )
  new_state, _ = jax.jit(aace_jax.make_train_step(aace_jax.linen_apply_fn(model), tx))(state, batch)

  def stats_at(params):
    _, updates = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]}, batch["image"], train=True, mutable=["batch_stats"]
    )
    return updates["batch_stats"]

  first_pass = stats_at(variables["params"])
  chex.assert_trees_all_close(new_state.model_state["batch_stats"], first_pass, rtol=1e-6, atol=1e-7)

  # The perturbed pass would have given other statistics: the test can tell them apart.
  def mean_aace(p):
    logits = model.apply(
      {"params": p, "batch_stats": variables["batch_stats"]}, batch["image"], train=True, mutable=["batch_stats"]
    )[0]
    return aace_jax.aace_cross_entropy(logits, batch["label"]).mean()

  w_adv = jax.tree.map(lambda w, g: w - 0.5 * g, variables["params"], jax.grad(mean_aace)(variables["params"]))
  second_mean = stats_at(w_adv)["BatchNorm_0"]["mean"]
  assert np.abs(second_mean - first_pass["BatchNorm_0"]["mean"]).max() > 1e-4


def test_eval_step_counts_masked_batches():
  params = mlp_params()
  batch = make_batch(n=8)
  batch["mask"] = jnp.array([1, 1, 1, 1, 1, 0, 0, 0], jnp.float32)
  batch["label"] = batch["label"].at[5:].set(-1)  # padding labels are ignored, not NaN
  state = aace_jax.TrainState.create(params=params, tx=optax.sgd(0.1), rng=jax.random.key(0))
  metrics = jax.jit(aace_jax.make_eval_step(mlp_apply))(state, batch)
  logits = mlp_apply(params, {}, batch["image"][:5], train=False, rng=None)[0]
  labels = batch["label"][:5]
  np.testing.assert_allclose(metrics["loss_sum"], aace_jax.cross_entropy(logits, labels).sum(), rtol=1e-6)
  assert metrics["correct"] == np.sum(np.argmax(logits, -1) == labels)
  assert metrics["count"] == 5


def test_bad_step_arguments():
  with pytest.raises(TypeError, match="sync_perturbation must be a bool, got 'no'"):
    aace_jax.make_train_step(mlp_apply, optax.sgd(0.1), sync_perturbation="no")
  step = aace_jax.make_train_step(mlp_apply, optax.sgd(0.1), axis_name="batch")
  with pytest.raises(ValueError, match="axis_name='batch' but is mapped over 'data'"):
    aace_jax.pmap_step(step, axis_name="data")


@pytest.mark.parametrize("method", ["sgd", "aace_sam", "sam"])
def test_gradient_accumulation_equals_the_big_batch(method):
  make_tx, perturbation_loss = METHODS.get(method, (lambda: optax.sgd(0.1, momentum=0.9), aace_jax.aace_cross_entropy))
  tx = make_tx()
  batch = make_batch(n=32)
  params = mlp_params()
  results = []
  for k in (1, 4):
    step = jax.jit(aace_jax.make_train_step(mlp_apply, tx, perturbation_loss=perturbation_loss, grad_accum_steps=k))
    state = aace_jax.TrainState.create(params=params, tx=tx, rng=jax.random.key(0))
    for _ in range(3):
      state, metrics = step(state, batch)
    results.append((state, metrics))
  (big, big_metrics), (accumulated, accumulated_metrics) = results
  for key in big.params:
    np.testing.assert_allclose(accumulated.params[key], big.params[key], rtol=1e-5, atol=1e-6)
  for name in ("loss", "loss_at_w_adv", "perturbation_norm", "grad_norm", "accuracy"):
    np.testing.assert_allclose(accumulated_metrics[name], big_metrics[name], rtol=1e-5, err_msg=name)
  with pytest.raises(ValueError, match="a batch of 32 examples does not split into grad_accum_steps=3"):
    jax.jit(aace_jax.make_train_step(mlp_apply, tx, grad_accum_steps=3))(
      aace_jax.TrainState.create(params=params, tx=tx, rng=jax.random.key(0)), batch
    )


def test_gradient_accumulation_averages_batchnorm_statistics():
  model = BatchNormNet()
  batch = make_batch(n=32)
  variables = model.init(jax.random.key(0), batch["image"], train=False)
  tx = aace_jax.aace_sam(optax.sgd(0.1), 0.2)
  state = aace_jax.TrainState.create(
    params=variables["params"], model_state={"batch_stats": variables["batch_stats"]}, tx=tx, rng=jax.random.key(0)
  )
  new_state, _ = jax.jit(aace_jax.make_train_step(aace_jax.linen_apply_fn(model), tx, grad_accum_steps=2))(state, batch)
  halves = [first_pass_batch_stats(model, variables, batch["image"][i * 16 : (i + 1) * 16]) for i in range(2)]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *halves)
  chex.assert_trees_all_close(new_state.model_state["batch_stats"], expected, rtol=1e-5, atol=1e-6)


def test_nonfinite_gradient_at_w_adv_alone_is_skipped():
  # The network is finite at w and NaN anywhere else: only the second pass sees it.
  params = mlp_params()
  w1 = params["w1"]

  def apply_fn(params, model_state, images, *, train, rng):
    logits, model_state = mlp_apply(params, model_state, images, train=train, rng=rng)
    return logits * jnp.where(jnp.all(params["w1"] == w1), 1.0, jnp.nan), model_state

  tx = aace_jax.aace_sam(optax.sgd(0.1), 0.2)
  state = aace_jax.TrainState.create(params=params, tx=tx, rng=jax.random.key(0))
  skipped, metrics = jax.jit(aace_jax.make_train_step(apply_fn, tx))(state, make_batch())
  assert np.isfinite(metrics["first_pass_grad_norm"]) and np.isnan(metrics["grad_norm"])
  assert metrics["skipped_steps"] == 1
  np.testing.assert_array_equal(skipped.params["w1"], w1)


@pytest.mark.parametrize("method", ["sgd", "aace_sam"])
def test_nonfinite_batch_is_skipped(method):
  model = BatchNormNet()
  batch = make_batch(n=32)
  variables = model.init(jax.random.key(0), batch["image"], train=False)
  tx = optax.sgd(0.1, momentum=0.9) if method == "sgd" else aace_jax.aace_sam(optax.sgd(0.1, momentum=0.9), 0.2)
  state = aace_jax.TrainState.create(
    params=variables["params"], model_state={"batch_stats": variables["batch_stats"]}, tx=tx, rng=jax.random.key(0)
  )
  step = jax.jit(aace_jax.make_train_step(aace_jax.linen_apply_fn(model), tx))
  state, metrics = step(state, batch)
  assert metrics["skipped_steps"] == 0
  poisoned = dict(batch, image=batch["image"].at[3, 2].set(jnp.nan))
  skipped, metrics = step(state, poisoned)
  assert metrics["skipped_steps"] == 1
  assert int(skipped.step) == int(state.step) + 1
  for before, after in zip(
    jax.tree.leaves((state.params, state.model_state, state.opt_state)),
    jax.tree.leaves((skipped.params, skipped.model_state, skipped.opt_state)),
  ):
    np.testing.assert_array_equal(after, before)
  recovered, metrics = step(skipped, batch)
  assert metrics["skipped_steps"] == 0
  assert np.all(np.isfinite(recovered.params["Dense_0"]["kernel"]))
  assert np.abs(recovered.params["Dense_0"]["kernel"] - state.params["Dense_0"]["kernel"]).max() > 0


def test_bad_accumulation_argument():
  with pytest.raises(ValueError, match="grad_accum_steps must be a positive int, got 0"):
    aace_jax.make_train_step(mlp_apply, optax.sgd(0.1), grad_accum_steps=0)


@pytest.mark.parametrize("case", ["learning_rate", "weight_decay", "batch_stats"])
def test_step_that_would_make_the_state_nonfinite_is_skipped(case):
  """Finite gradients, non-finite results: a NaN learning rate or weight decay, BatchNorm overflowing."""
  model = BatchNormNet()
  batch = make_batch(n=32)
  variables = model.init(jax.random.key(0), batch["image"], train=False)
  base = {
    "learning_rate": optax.sgd(jnp.inf),
    "weight_decay": optax.chain(optax.add_decayed_weights(jnp.nan), optax.sgd(0.1)),
    "batch_stats": optax.sgd(0.1),
  }[case]
  tx = aace_jax.aace_sam(base, 0.2)
  state = aace_jax.TrainState.create(
    params=variables["params"], model_state={"batch_stats": variables["batch_stats"]}, tx=tx, rng=jax.random.key(0)
  )
  if case == "batch_stats":
    # One huge but finite input: its squares overflow float32 in the running variance.
    batch = dict(batch, image=batch["image"].at[3].set(3e19))
  step = jax.jit(aace_jax.make_train_step(aace_jax.linen_apply_fn(model), tx))
  new, metrics = step(state, batch)
  assert metrics["skipped_steps"] == 1
  for before, after in zip(
    jax.tree.leaves((state.params, state.model_state)), jax.tree.leaves((new.params, new.model_state)), strict=True
  ):
    np.testing.assert_array_equal(after, before)


def test_multisteps_is_refused_with_a_pointer_to_grad_accum_steps():
  tx = optax.MultiSteps(aace_jax.aace_sam(optax.sgd(0.1), 0.2), every_k_schedule=2)
  state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  step = jax.jit(aace_jax.make_train_step(mlp_apply, tx))
  with pytest.raises(TypeError, match="optax.MultiSteps, which make_train_step receives .* grad_accum_steps=k"):
    step(state, make_batch())


def test_extra_metrics_are_batch_means_on_the_first_pass_logits():
  tx = aace_jax.aace_sam(optax.sgd(0.1), 0.2)
  params, batch = mlp_params(), make_batch()
  state = aace_jax.TrainState.create(params=params, tx=tx, rng=jax.random.key(0))
  top_class = lambda logits, labels: (jnp.argmax(logits, -1) == 0).astype(jnp.float32)  # noqa: E731
  step = jax.jit(
    aace_jax.make_train_step(
      mlp_apply, tx, extra_metrics={"aace_kl": aace_jax.aace_kl_divergence, "picks_class_0": top_class}
    )
  )
  _, metrics = step(state, batch)
  logits, _ = mlp_apply(params, {}, batch["image"], train=True, rng=None)  # at w, before the update
  np.testing.assert_allclose(metrics["aace_kl"], aace_jax.aace_kl_divergence(logits, batch["label"]).mean(), rtol=1e-6)
  assert float(metrics["picks_class_0"]) == float(np.mean(np.argmax(logits, -1) == 0))
  with pytest.raises(ValueError, match=r"extra_metrics may not reuse the names \['loss'\]"):
    aace_jax.make_train_step(mlp_apply, tx, extra_metrics={"loss": aace_jax.cross_entropy})


def test_the_names_renamed_since_0_1_0_still_read_with_a_deprecation_warning():
  from aace_jax import _sam
  from aace_jax import _train_step

  tx = aace_jax.aace_sam(optax.sgd(0.1), rho=0.2)
  step = jax.jit(aace_jax.make_train_step(mlp_apply, tx))
  state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  state, metrics = step(state, make_batch())
  assert isinstance(metrics, dict) and set(metrics) == set(_train_step.STEP_METRICS) - {"learning_rate"}
  for old, new in _train_step.RENAMED_METRICS.items():
    with pytest.warns(DeprecationWarning, match=f"the step metric '{old}' is deprecated .* metrics\\['{new}'\\]"):
      assert metrics[old] == metrics[new]
  assert set(_sam.RENAMED_STATE_FIELDS) == {"perturbed_loss", "perturbed_grad_norm", "perturbation_grad_norm"}
  for old, new in _sam.RENAMED_STATE_FIELDS.items():
    with pytest.warns(DeprecationWarning, match=f"SAMState.{old} is deprecated .* read SAMState.{new}"):
      assert getattr(state.opt_state, old) == getattr(state.opt_state, new)
  with pytest.raises(KeyError):
    metrics["no_such_metric"]
  # Still a pytree of the same leaves: the host gets it back as it left the device.
  assert jax.tree.leaves(jax.device_get(metrics)) == jax.tree.leaves(metrics)
