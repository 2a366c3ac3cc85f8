"""Cheaper sharpness-aware steps: a perturbation reused for k steps, plain steps between, part-batch first passes.

The references are written out by hand with `jax.grad` on the test MLP: the
library's update is never its own oracle.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aace_jax
from tests.helpers import BatchNormNet
from tests.helpers import jax_mlp
from tests.helpers import make_batch
from tests.helpers import mlp_apply
from tests.helpers import mlp_params
from tests.helpers import without_keys

LR, MOMENTUM = 0.1, 0.9


def base():
  return optax.sgd(LR, momentum=MOMENTUM)


def mean_loss(params, batch, fn):
  return fn(jax_mlp(params, batch["image"]), batch["label"]).mean()


def reference_run(batch, steps, *, every, reuse, rho=0.2, fraction=1.0, aace=True):
  """Parameters after `steps` steps, written out: e from the first pass every `every` steps, kept or zero between."""
  params, momentum, kept = mlp_params(), None, None
  first = {k: v[: round(fraction * len(batch["label"]))] for k, v in batch.items()}
  for step in range(steps):
    if step % every == 0:
      if aace:
        g = jax.grad(mean_loss)(params, first, aace_jax.aace_cross_entropy)
        kept = jax.tree.map(lambda g: -rho * g, g)
      else:
        g = jax.grad(mean_loss)(params, first, aace_jax.cross_entropy)
        scale = rho / (jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g))) + 1e-12)
        kept = jax.tree.map(lambda g, scale=scale: scale * g, g)
      perturbation = kept
    else:
      perturbation = kept if reuse else jax.tree.map(jnp.zeros_like, kept)
    w_adv = jax.tree.map(jnp.add, params, perturbation)
    grads = jax.grad(mean_loss)(w_adv, batch, aace_jax.cross_entropy)
    momentum = grads if momentum is None else jax.tree.map(lambda m, g: MOMENTUM * m + g, momentum, grads)
    params = jax.tree.map(lambda w, m: w - LR * m, params, momentum)
  return params


def library_run(
  tx, batch, steps, *, perturbation_loss=aace_jax.aace_cross_entropy, host=False, compiled=False, **step_kwargs
):
  state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  if host:  # two compiled steps chosen by the step number, built by hand
    every = step_kwargs.pop("every")
    full, between = (
      jax.jit(aace_jax.make_train_step(mlp_apply, tx, perturbation_loss=perturbation_loss, new_perturbation=new))
      for new in (True, False)
    )
    metrics = []
    for step in range(steps):
      state, m = (full if step % every == 0 else between)(state, batch)
      metrics.append(m)
    return state, metrics
  step = aace_jax.make_train_step(mlp_apply, tx, perturbation_loss=perturbation_loss, **step_kwargs)
  step_fn = step.jit() if compiled else jax.jit(step)  # a CompiledStep, or one program
  metrics = []
  for _ in range(steps):
    state, m = step_fn(state, batch)
    metrics.append(m)
  return state, metrics


FORMS = {
  "one program, first pass selected": {},
  "one program, first pass in a cond": {"conditional_first_pass": True},
  "CompiledStep": {"compiled": True},
  "by hand": {"host": True},
}


@pytest.mark.parametrize("every", [2, 3])
@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("form", list(FORMS))
def test_aace_sam_reuses_its_perturbation_or_takes_plain_steps_between(every, reuse, form):
  batch = make_batch()
  tx = aace_jax.aace_sam(base(), 0.2, perturb_every=every, reuse_perturbation=reuse)
  kwargs = {**FORMS[form], **({"every": every} if form == "by hand" else {})}
  state, metrics = library_run(tx, batch, 7, **kwargs)
  chex.assert_trees_all_close(state.params, reference_run(batch, 7, every=every, reuse=reuse), rtol=2e-5, atol=2e-6)
  norms = [float(m["perturbation_norm"]) for m in metrics]
  for step, norm in enumerate(norms):
    if step % every and not reuse:
      assert norm == 0  # a plain step applies no perturbation
    else:
      assert norm > 0
  if reuse:  # the kept perturbation is applied again: same length, up to w + e - w rounding
    np.testing.assert_allclose(norms[1], norms[0], rtol=1e-5)


def test_sam_reuse_follows_the_reference():
  batch = make_batch()
  tx = aace_jax.sam(base(), 0.05, perturb_every=3)
  state, _ = library_run(tx, batch, 7, perturbation_loss=aace_jax.cross_entropy)
  expected = reference_run(batch, 7, every=3, reuse=True, rho=0.05, aace=False)
  chex.assert_trees_all_close(state.params, expected, rtol=2e-5, atol=2e-6)


def test_first_pass_on_part_of_the_batch_follows_the_reference():
  batch = make_batch(n=32)
  state, _ = library_run(aace_jax.aace_sam(base(), 0.2), batch, 4, perturbation_batch_fraction=0.25)
  chex.assert_trees_all_close(
    state.params, reference_run(batch, 4, every=1, reuse=True, fraction=0.25), rtol=2e-5, atol=2e-6
  )
  full, _ = library_run(aace_jax.aace_sam(base(), 0.2), batch, 4)
  assert not np.allclose(np.asarray(full.params["w1"]), np.asarray(state.params["w1"]))


def test_every_update_perturbing_is_the_transformation_of_before_bit_for_bit():
  batch = make_batch()
  default, _ = library_run(aace_jax.aace_sam(base(), 0.2), batch, 3)
  explicit, _ = library_run(
    aace_jax.aace_sam(base(), 0.2, perturb_every=1, reuse_perturbation=False), batch, 3, perturbation_batch_fraction=1.0
  )
  chex.assert_trees_all_equal(without_keys(default), without_keys(explicit))
  # No counter and no kept perturbation: the state holds what it held before these options.
  sam_state = default.opt_state
  assert sam_state.steps_since_perturbation == () and sam_state.kept_perturbation == ()
  assert len(jax.tree.leaves(sam_state)) == len(jax.tree.leaves(base().init(mlp_params()))) + 4


def test_every_form_of_the_cycle_gives_the_same_numbers():
  batch = make_batch()
  tx = aace_jax.aace_sam(base(), 0.2, perturb_every=3)
  runs = {
    form: library_run(tx, batch, 7, **{**kwargs, **({"every": 3} if form == "by hand" else {})})
    for form, kwargs in FORMS.items()
  }
  reference_state, reference_metrics = runs["one program, first pass in a cond"]
  for state, metrics in runs.values():
    chex.assert_trees_all_close(without_keys(state), without_keys(reference_state), rtol=1e-6, atol=1e-7)
    for a, b in zip(metrics, reference_metrics):
      chex.assert_trees_all_close(dict(a), dict(b), rtol=1e-5, atol=1e-7)
  # A CompiledStep under jax.jit of its own caller is traced: one program, the same numbers.
  step = jax.jit(aace_jax.make_train_step(mlp_apply, tx).jit())
  state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  for _ in range(7):
    state, _ = step(state, batch)
  chex.assert_trees_all_close(without_keys(state), without_keys(reference_state), rtol=1e-6, atol=1e-7)


def test_the_first_pass_does_not_run_between_perturbations():
  passes = []

  def counting_apply(params, model_state, images, *, train, rng):
    jax.debug.callback(lambda: passes.append(1))
    return mlp_apply(params, model_state, images, train=train, rng=rng)

  batch = make_batch()
  tx = aace_jax.aace_sam(base(), 0.2, perturb_every=4)
  for compile, expected in (
    (lambda step: step.jit(), 2 * 2 + 6),  # two passes on steps 0 and 4, one on the six between
    (lambda step: jax.jit(step), 2 * 2 + 6),  # conditional_first_pass=True: the same in one program
    (lambda step: jax.jit(step), 2 * 8),  # one program on a CPU: the first pass runs on every update
  ):
    passes.clear()
    conditional = None if expected == 2 * 8 else True
    step = compile(aace_jax.make_train_step(counting_apply, tx, conditional_first_pass=conditional))
    state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
    for _ in range(8):
      state, _ = step(state, batch)
    jax.effects_barrier()
    assert len(passes) == expected

  passes.clear()
  every_step = aace_jax.aace_sam(base(), 0.2)
  state = aace_jax.TrainState.create(params=mlp_params(), tx=every_step, rng=jax.random.key(0))
  step = jax.jit(aace_jax.make_train_step(counting_apply, every_step))
  for _ in range(4):
    state, _ = step(state, batch)
  jax.effects_barrier()
  assert len(passes) == 8  # the counter counts passes: two per step


def test_batchnorm_statistics_come_from_the_only_pass_between_perturbations():
  model = BatchNormNet()
  batch = make_batch(n=16)
  variables = model.init(jax.random.key(0), batch["image"], train=False)
  apply_fn = aace_jax.linen_apply_fn(model)
  tx = aace_jax.aace_sam(base(), 0.2, perturb_every=2)
  state = aace_jax.TrainState.create(
    params=variables["params"], model_state={"batch_stats": variables["batch_stats"]}, tx=tx, rng=jax.random.key(0)
  )
  step = jax.jit(aace_jax.make_train_step(apply_fn, tx))
  state, _ = step(state, batch)  # computes and keeps e
  kept = state.opt_state.kept_perturbation
  w_adv = jax.tree.map(jnp.add, state.params, kept)
  variables = {"params": w_adv, "batch_stats": state.model_state["batch_stats"]}
  _, expected = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
  after, _ = step(state, batch)  # a reuse step: its only pass is at w + e
  chex.assert_trees_all_close(after.model_state["batch_stats"], expected["batch_stats"], rtol=1e-5, atol=1e-6)


def test_batchnorm_statistics_come_from_the_first_pass_examples_with_a_fraction():
  model = BatchNormNet()
  batch = make_batch(n=16)
  variables = model.init(jax.random.key(0), batch["image"], train=False)
  tx = aace_jax.aace_sam(base(), 0.2)
  state = aace_jax.TrainState.create(
    params=variables["params"], model_state={"batch_stats": variables["batch_stats"]}, tx=tx, rng=jax.random.key(0)
  )
  step = jax.jit(aace_jax.make_train_step(aace_jax.linen_apply_fn(model), tx, perturbation_batch_fraction=0.5))
  after, metrics = step(state, batch)
  _, expected = model.apply(variables, batch["image"][:8], train=True, mutable=["batch_stats"])
  chex.assert_trees_all_close(after.model_state["batch_stats"], expected["batch_stats"], rtol=1e-5, atol=1e-6)
  assert float(metrics["accuracy"]) * 8 == pytest.approx(round(float(metrics["accuracy"]) * 8))  # of 8 examples


@pytest.mark.parametrize("compiled", [False, True])
def test_resuming_in_the_middle_of_a_cycle_is_bit_identical(compiled):
  batch = make_batch()
  tx = aace_jax.aace_sam(base(), 0.2, perturb_every=4)
  step = aace_jax.make_train_step(mlp_apply, tx)
  step = step.jit() if compiled else jax.jit(step)
  state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  straight = state
  for _ in range(6):
    straight, _ = step(straight, batch)
  for _ in range(2):
    state, _ = step(state, batch)
  # What a checkpoint holds: host arrays, put back on the device.
  restored = jax.tree.map(jnp.asarray, jax.device_get(state))
  assert int(restored.opt_state.steps_since_perturbation) == 2
  for _ in range(4):
    restored, _ = step(restored, batch)
  chex.assert_trees_all_equal(without_keys(straight), without_keys(restored))


@pytest.mark.parametrize("compiled", [False, True])
def test_a_skipped_step_changes_nothing_and_does_not_advance_the_cycle(compiled):
  batch = make_batch()
  tx = aace_jax.aace_sam(base(), 0.2, perturb_every=3)
  step = aace_jax.make_train_step(mlp_apply, tx)
  step = step.jit() if compiled else jax.jit(step)
  state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  state, _ = step(state, batch)
  bad = {**batch, "image": batch["image"].at[0, 0].set(jnp.nan)}
  after, metrics = step(state, bad)
  assert float(metrics["skipped_steps"]) == 1
  chex.assert_trees_all_equal(without_keys(after._replace(step=state.step)), without_keys(state))


def test_bad_arguments_name_their_values():
  with pytest.raises(ValueError, match="perturb_every must be a positive Python int.*got 0"):
    aace_jax.aace_sam(base(), perturb_every=0)
  with pytest.raises(ValueError, match="perturb_every.*got 2.0"):
    aace_jax.sam(base(), perturb_every=2.0)
  with pytest.raises(TypeError, match="reuse_perturbation must be a bool, got 1"):
    aace_jax.aace_sam(base(), perturb_every=2, reuse_perturbation=1)
  for fraction in (0, 1.5, True):
    with pytest.raises(ValueError, match=f"perturbation_batch_fraction must be a number in \\(0, 1\\], got {fraction}"):
      aace_jax.make_train_step(mlp_apply, aace_jax.aace_sam(base()), perturbation_batch_fraction=fraction)
  with pytest.raises(TypeError, match="new_perturbation must be None or a bool, got 'yes'"):
    aace_jax.make_train_step(mlp_apply, aace_jax.aace_sam(base()), new_perturbation="yes")
  batch = make_batch(n=8)
  state = aace_jax.TrainState.create(params=mlp_params(), tx=base(), rng=jax.random.key(0))
  with pytest.raises(ValueError, match="perturbation_batch_fraction=0.5 needs a sharpness-aware tx"):
    aace_jax.make_train_step(mlp_apply, base(), perturbation_batch_fraction=0.5)(state, batch)
  tx = aace_jax.aace_sam(base())
  state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="of a batch of 8 examples is 3, which does not split into grad_accum_steps=2"):
    aace_jax.make_train_step(mlp_apply, tx, perturbation_batch_fraction=0.375, grad_accum_steps=2)(state, batch)


def test_inject_hyperparams_takes_perturb_every_as_a_static_argument():
  batch = make_batch()
  tx = optax.inject_hyperparams(aace_jax.aace_sam, static_args=("perturb_every",))(
    optimizer=base(), rho=0.2, perturb_every=3
  )
  state, _ = library_run(tx, batch, 5)
  chex.assert_trees_all_close(state.params, reference_run(batch, 5, every=3, reuse=True), rtol=2e-5, atol=2e-6)
