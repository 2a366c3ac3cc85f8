"""Flax NNX models: the pure step (`nnx_split` + `nnx_apply_fn`) and the `nnx.Optimizer` route.

The Linen step is the reference: the same network with the same weights must
train identically, BatchNorm statistics must come from the first pass only
(checked against NumPy), and the second pass must see the first pass's
dropout mask.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import aace_jax
from tests.helpers import BatchNormNet
from tests.helpers import make_batch


class NnxBatchNormNet(nnx.Module):
  """`tests.helpers.BatchNormNet` in NNX, with an optional dropout before the head."""

  def __init__(self, rngs, dropout=0.0):
    self.dense = nnx.Linear(12, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(8, 5, rngs=rngs)

  def __call__(self, x):
    return self.head(self.drop(nnx.relu(self.norm(self.dense(x)))))


def linen_and_nnx_with_the_same_weights(dropout=0.0):
  linen = BatchNormNet()
  variables = linen.init(jax.random.key(0), jnp.zeros((1, 12)), train=False)
  model = NnxBatchNormNet(nnx.Rngs(0, dropout=5), dropout)
  p = variables["params"]
  model.dense.kernel[...], model.dense.bias[...] = p["Dense_0"]["kernel"], p["Dense_0"]["bias"]
  model.norm.scale[...], model.norm.bias[...] = p["BatchNorm_0"]["scale"], p["BatchNorm_0"]["bias"]
  model.head.kernel[...], model.head.bias[...] = p["Dense_1"]["kernel"], p["Dense_1"]["bias"]
  return linen, variables, model


def sam_tx(rho=0.2):
  return aace_jax.aace_sam(optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)), rho)


def run_pure_step(apply_fn, params, model_state, tx, steps, batch, **step_kwargs):
  state = aace_jax.TrainState.create(params=params, model_state=model_state, tx=tx, rng=jax.random.key(3))
  step = jax.jit(aace_jax.make_train_step(apply_fn, tx, **step_kwargs))
  metrics = []
  for _ in range(steps):
    state, m = step(state, batch)
    metrics.append(m)
  return state, metrics


@nnx.jit
def nnx_aace_sam_step(model, optimizer, x, y):
  """The nnx.Optimizer route: AACE at w, cross-entropy at w_adv."""
  grads, grad_fn = aace_jax.nnx_sharpness_aware_grads(
    model,
    lambda m: aace_jax.aace_cross_entropy(m(x), y).mean(),
    lambda m: aace_jax.cross_entropy(m(x), y).mean(),
  )
  optimizer.update(model, grads, grad_fn=grad_fn)


def numpy_first_pass_statistics(kernel, bias, images, momentum=0.9):
  """BatchNorm running mean and variance after one training pass from (0, 1), restated in NumPy."""
  hidden = np.asarray(images, np.float64) @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
  return (1 - momentum) * hidden.mean(0), momentum * 1.0 + (1 - momentum) * hidden.var(0)


def test_nnx_step_equals_the_linen_step_for_the_same_weights():
  linen, variables, model = linen_and_nnx_with_the_same_weights()
  batch = make_batch()
  tx = sam_tx()
  linen_state, _ = run_pure_step(
    aace_jax.linen_apply_fn(linen), variables["params"], {"batch_stats": variables["batch_stats"]}, tx, 3, batch
  )
  graphdef, params, model_state = aace_jax.nnx_split(model)
  nnx_state, _ = run_pure_step(aace_jax.nnx_apply_fn(graphdef), params, model_state, tx, 3, batch)
  expected = linen_state.params
  got = nnx_state.params
  for ours, theirs in [
    (got["dense"]["kernel"], expected["Dense_0"]["kernel"]),
    (got["norm"]["scale"], expected["BatchNorm_0"]["scale"]),
    (got["head"]["bias"], expected["Dense_1"]["bias"]),
    (nnx_state.model_state["norm"]["mean"], linen_state.model_state["batch_stats"]["BatchNorm_0"]["mean"]),
    (nnx_state.model_state["norm"]["var"], linen_state.model_state["batch_stats"]["BatchNorm_0"]["var"]),
  ]:
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(got["dense"]["kernel"]) - np.asarray(variables["params"]["Dense_0"]["kernel"])).max() > 1e-3
  # The trained state goes back into the module.
  nnx.update(model, nnx_state.params, nnx_state.model_state)
  np.testing.assert_array_equal(model.head.bias[...], got["head"]["bias"])


def test_batchnorm_statistics_come_from_the_first_pass_only_on_both_routes():
  batch = make_batch()
  _, _, model = linen_and_nnx_with_the_same_weights()
  kernel, bias = np.asarray(model.dense.kernel[...]), np.asarray(model.dense.bias[...])
  expected_mean, expected_var = numpy_first_pass_statistics(kernel, bias, batch["image"])

  graphdef, params, model_state = aace_jax.nnx_split(model)
  state, _ = run_pure_step(aace_jax.nnx_apply_fn(graphdef), params, model_state, sam_tx(rho=1.0), 1, batch)
  np.testing.assert_allclose(state.model_state["norm"]["mean"], expected_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.model_state["norm"]["var"], expected_var, rtol=1e-5, atol=1e-6)

  optimizer = nnx.Optimizer(model, sam_tx(rho=1.0), wrt=nnx.Param)

  nnx_aace_sam_step(model, optimizer, batch["image"], batch["label"])
  np.testing.assert_allclose(model.norm.mean[...], expected_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.norm.var[...], expected_var, rtol=1e-5, atol=1e-6)


def test_nnx_optimizer_route_equals_the_pure_step():
  batch = make_batch()
  _, _, model = linen_and_nnx_with_the_same_weights()
  graphdef, params, model_state = aace_jax.nnx_split(model)
  state, metrics = run_pure_step(aace_jax.nnx_apply_fn(graphdef), params, model_state, sam_tx(), 3, batch)

  optimizer = nnx.Optimizer(model, sam_tx(), wrt=nnx.Param)

  for _ in range(3):
    nnx_aace_sam_step(model, optimizer, batch["image"], batch["label"])
  np.testing.assert_allclose(model.dense.kernel[...], state.params["dense"]["kernel"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.norm.var[...], state.model_state["norm"]["var"], rtol=1e-5, atol=1e-6)
  # The loss at w_adv came out of grad_fn, with no third pass.
  np.testing.assert_allclose(float(optimizer.opt_state.loss_at_w_adv[...]), metrics[-1]["loss_at_w_adv"], rtol=1e-5)


@pytest.mark.parametrize("route", ["pure_step", "nnx_optimizer"])
def test_both_passes_use_the_same_dropout_mask(route):
  # With rho = 0 and the same loss in both passes, the two gradients are equal
  # exactly when the two passes drop the same units.
  batch = make_batch()
  _, _, model = linen_and_nnx_with_the_same_weights(dropout=0.5)
  tx = aace_jax.sam(optax.sgd(0.0), rho=0.0)
  if route == "pure_step":
    graphdef, params, model_state = aace_jax.nnx_split(model)
    _, metrics = run_pure_step(
      aace_jax.nnx_apply_fn(graphdef), params, model_state, tx, 2, batch, perturbation_loss=aace_jax.cross_entropy
    )
    first, second = [(float(m["first_pass_grad_norm"]), float(m["grad_norm"]), float(m["loss"])) for m in metrics]
  else:
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    loss = lambda m: aace_jax.cross_entropy(m(batch["image"]), batch["label"]).mean()

    @nnx.jit
    def train_step(model, optimizer):
      grads, grad_fn = aace_jax.nnx_sharpness_aware_grads(model, loss, loss)
      optimizer.update(model, grads, grad_fn=grad_fn)

    def norms():
      train_step(model, optimizer)
      sam_state = optimizer.opt_state
      return (
        float(sam_state.first_pass_grad_norm[...]),
        float(sam_state.grad_norm_at_w_adv[...]),
        float(sam_state.loss_at_w_adv[...]),
      )

    first, second = norms(), norms()
  np.testing.assert_allclose(first[1], first[0], rtol=1e-6)
  np.testing.assert_allclose(second[1], second[0], rtol=1e-6)
  assert first[2] != second[2]  # and the next step draws a new mask (the weights did not move: lr 0)


def test_linen_apply_fn_points_an_nnx_model_to_its_route():
  _, _, model = linen_and_nnx_with_the_same_weights()
  with pytest.raises(TypeError, match=r"NnxBatchNormNet is not a Flax Linen module.*aace_jax.nnx_split\(model\)"):
    aace_jax.linen_apply_fn(model)


def test_eval_mode_uses_running_statistics_and_no_dropout():
  _, _, model = linen_and_nnx_with_the_same_weights(dropout=0.5)
  graphdef, params, model_state = aace_jax.nnx_split(model)
  apply_fn = aace_jax.nnx_apply_fn(graphdef)
  images = make_batch()["image"]
  logits, same_state = apply_fn(params, model_state, images, train=False, rng=jax.random.key(0))
  model.eval()
  np.testing.assert_allclose(logits, model(images), rtol=1e-6)
  assert same_state is model_state


def test_a_grad_fn_written_for_a_module_is_told_what_to_take():
  batch = make_batch()
  _, _, model = linen_and_nnx_with_the_same_weights()
  optimizer = nnx.Optimizer(model, sam_tx(), wrt=nnx.Param)
  grads = nnx.grad(lambda m: aace_jax.aace_cross_entropy(m(batch["image"]), batch["label"]).mean())(model)
  module_style = nnx.grad(lambda m: aace_jax.cross_entropy(m(batch["image"]), batch["label"]).mean())
  with pytest.raises(TypeError, match=r"here an nnx.State.*not take a module.*nnx_sharpness_aware_grads"):
    optimizer.update(model, grads, grad_fn=module_style)
