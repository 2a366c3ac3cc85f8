"""`make_train_step(logits_fn=...)`: any batch, a target per token, weights, against hand-written references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aace_jax
from tests.helpers import TOKEN_LENGTH as LENGTH
from tests.helpers import make_batch
from tests.helpers import mlp_apply
from tests.helpers import mlp_params
from tests.helpers import next_token_fn
from tests.helpers import token_batch
from tests.helpers import token_logits
from tests.helpers import token_params
from tests.helpers import without_keys

RHO, LR = 0.2, 0.5


def weighted_mean_loss(params, batch, fn):
  """sum_i w_i l_i / sum_i w_i over every real next-token prediction of the batch, written out with NumPy masks."""
  tokens, lengths = np.asarray(batch["tokens"]), np.asarray(batch["lengths"])
  rows, cols = np.nonzero(np.arange(1, LENGTH)[None, :] < lengths[:, None])
  logits = token_logits(params, jnp.asarray(tokens[:, :-1]))[rows, cols]
  return fn(logits, jnp.asarray(tokens[rows, cols + 1])).mean()


def reference_steps(batch, steps):
  """AACE-SAM with plain SGD, by hand: w_adv = w - rho grad L_AACE(w), w <- w - lr grad L_CE(w_adv)."""
  params = token_params()
  for _ in range(steps):
    g = jax.grad(weighted_mean_loss)(params, batch, aace_jax.aace_cross_entropy)
    w_adv = jax.tree.map(lambda w, g: w - RHO * g, params, g)
    g_adv = jax.grad(weighted_mean_loss)(w_adv, batch, aace_jax.cross_entropy)
    params = jax.tree.map(lambda w, g: w - LR * g, params, g_adv)
  return params


def library_steps(batch, steps, **step_kwargs):
  tx = aace_jax.aace_sam(optax.sgd(LR), RHO)
  state = aace_jax.TrainState.create(params=token_params(), tx=tx, rng=jax.random.key(0))
  step = jax.jit(aace_jax.make_train_step(tx=tx, logits_fn=next_token_fn, **step_kwargs))
  for _ in range(steps):
    state, metrics = step(state, batch)
  return state, metrics


def test_a_token_model_takes_weighted_means_over_its_real_tokens():
  batch = token_batch()
  state, metrics = library_steps(batch, 3)
  chex.assert_trees_all_close(state.params, reference_steps(batch, 3), rtol=1e-6, atol=1e-7)
  assert metrics["skipped_steps"] == 0
  # The step moved the parameters, and the mask mattered: a plain mean over every position is another update.
  assert np.abs(state.params["out"] - token_params()["out"]).max() > 1e-2
  unmasked = jax.tree.map(lambda x: x, batch)
  unmasked["lengths"] = jnp.full_like(batch["lengths"], LENGTH)
  unmasked["tokens"] = jnp.where(batch["tokens"] < 0, 0, batch["tokens"])
  assert np.abs(reference_steps(unmasked, 3)["out"] - state.params["out"]).max() > 1e-3


def test_metrics_are_weighted_means_of_the_first_pass():
  batch = token_batch()
  _, metrics = library_steps(batch, 1)
  params = token_params()
  np.testing.assert_allclose(metrics["loss"], weighted_mean_loss(params, batch, aace_jax.cross_entropy), rtol=1e-6)
  np.testing.assert_allclose(
    metrics["first_pass_loss"], weighted_mean_loss(params, batch, aace_jax.aace_cross_entropy), rtol=1e-6
  )
  correct = lambda logits, targets: (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  np.testing.assert_allclose(metrics["accuracy"], weighted_mean_loss(params, batch, correct), rtol=1e-6)


def test_what_padding_holds_changes_nothing():
  """Padded positions may hold any target, an out-of-range one included: bit for bit the same step."""
  runs = [library_steps(token_batch(pad=pad), 2) for pad in (-1, 0, 10**6)]
  for state, metrics in runs[1:]:
    chex.assert_trees_all_equal((state.params, metrics), (runs[0][0].params, runs[0][1]))


def test_accumulation_takes_the_weighted_mean_over_the_whole_batch():
  """Micro-batches hold different numbers of real tokens: the gradient is still the whole batch's weighted mean."""
  batch = token_batch(n=8)
  weights_per_half = [int(np.sum(np.asarray(batch["lengths"])[half] - 1)) for half in (slice(0, 4), slice(4, 8))]
  assert weights_per_half[0] != weights_per_half[1]  # a mean of the micro-batches' means would differ
  state, _ = library_steps(batch, 2, grad_accum_steps=2)
  chex.assert_trees_all_close(state.params, reference_steps(batch, 2), rtol=1e-5, atol=1e-6)


def test_an_image_classifier_through_logits_fn_is_the_apply_fn_step_bit_for_bit():
  tx = aace_jax.aace_sam(optax.sgd(0.1, momentum=0.9), 0.2)
  state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  batch = make_batch()
  by_apply = jax.jit(aace_jax.make_train_step(mlp_apply, tx))(state, batch)
  by_logits = jax.jit(aace_jax.make_train_step(tx=tx, logits_fn=aace_jax.classifier_logits_fn(mlp_apply)))(state, batch)
  chex.assert_trees_all_equal(without_keys(by_logits), without_keys(by_apply))


def test_unit_weights_equal_no_weights():
  tx = aace_jax.aace_sam(optax.sgd(0.1, momentum=0.9), 0.2)
  state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  batch = dict(make_batch(), mask=jnp.ones(32))
  weighted = aace_jax.classifier_logits_fn(mlp_apply, mask_key="mask")
  got = jax.jit(aace_jax.make_train_step(tx=tx, logits_fn=weighted))(state, batch)
  expected = jax.jit(aace_jax.make_train_step(mlp_apply, tx))(state, batch)
  chex.assert_trees_all_close(without_keys(got), without_keys(expected), rtol=1e-6, atol=1e-7)


def test_eval_step_sums_weighted_targets():
  batch = token_batch()
  params = token_params()
  state = aace_jax.TrainState.create(params=params, tx=optax.sgd(0.1), rng=jax.random.key(0))
  sums = jax.jit(aace_jax.make_eval_step(logits_fn=next_token_fn))(state, batch)
  real = int(np.sum(np.asarray(batch["lengths"]) - 1))
  np.testing.assert_allclose(sums["count"], real)
  np.testing.assert_allclose(
    sums["loss_sum"] / real, weighted_mean_loss(params, batch, aace_jax.cross_entropy), rtol=1e-6
  )


def soft_targets_fn(params, model_state, batch, *, train, rng):
  logits, model_state = mlp_apply(params, model_state, batch["image"], train=train, rng=rng)
  return aace_jax.LossInputs(logits, jax.nn.one_hot(batch["label"], 5), None, model_state)


@pytest.mark.parametrize(
  "logits_fn, match",
  [
    (soft_targets_fn, r"targets are a distribution over the classes \(shape \(32, 5\), float32\), as mixup"),
    (
      lambda p, s, b, *, train, rng: aace_jax.LossInputs(
        mlp_apply(p, s, b["image"], train=train, rng=rng)[0], b["label"][:4], None, s
      ),
      r"targets of shape \(4,\) do not match logits of shape \(32, 5\); expected \(32,\)",
    ),
    (
      lambda p, s, b, *, train, rng: aace_jax.LossInputs(
        mlp_apply(p, s, b["image"], train=train, rng=rng)[0], b["label"], jnp.ones(3), s
      ),
      r"weights of shape \(3,\) do not match targets of shape \(32,\)",
    ),
    (
      lambda p, s, b, *, train, rng: mlp_apply(p, s, b["image"], train=train, rng=rng),
      "must return \\(logits, targets",
    ),
  ],
)
def test_bad_outputs_of_logits_fn_are_named_before_compiling(logits_fn, match):
  tx = aace_jax.aace_sam(optax.sgd(0.1), 0.2)
  state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  step = aace_jax.make_train_step(tx=tx, logits_fn=logits_fn)
  with pytest.raises((TypeError, ValueError), match=match):
    jax.jit(step).trace(state, make_batch())


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (
      dict(apply_fn=mlp_apply, tx=optax.sgd(0.1), logits_fn=next_token_fn),
      "give either apply_fn .* or logits_fn= .* not both",
    ),
    (dict(), "tx must be an optax transformation"),
    (dict(tx=optax.sgd(0.1)), "give either apply_fn .* not neither"),
    (dict(tx=optax.sgd(0.1), logits_fn="model"), "logits_fn must be callable, got 'model'"),
  ],
)
def test_bad_step_arguments_are_named(kwargs, match):
  with pytest.raises(TypeError, match=match):
    aace_jax.make_train_step(**kwargs)


def test_a_batch_whose_arrays_disagree_on_the_example_axis_is_named():
  tx = aace_jax.aace_sam(optax.sgd(0.1), 0.2)
  state = aace_jax.TrainState.create(params=token_params(), tx=tx, rng=jax.random.key(0))
  batch = dict(token_batch(n=8), lengths=jnp.full(6, 3))
  step = aace_jax.make_train_step(tx=tx, logits_fn=next_token_fn, grad_accum_steps=2)
  with pytest.raises(ValueError, match=r"same leading \(example\) dimension, got shapes \[\(6,\), \(8, 6\)\]"):
    jax.jit(step).trace(state, batch)
