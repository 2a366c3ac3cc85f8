"""pmap and shard_map steps on 8 fake CPU devices against single-device computations.

Run through tests/test_multidevice.py, which sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import aace_jax
from tests.helpers import BatchNormNet
from tests.helpers import first_pass_batch_stats
from tests.helpers import hand_step
from tests.helpers import make_batch
from tests.helpers import mlp_apply
from tests.helpers import mlp_params

DEVICES = 8
BATCH = 64

METHODS = {
  "aace_sam": (lambda: aace_jax.aace_sam(optax.sgd(0.1, momentum=0.9), 0.2), aace_jax.aace_cross_entropy),
  "sam": (lambda: aace_jax.sam(optax.sgd(0.1, momentum=0.9), 0.05), aace_jax.cross_entropy),
  "sgd": (lambda: optax.sgd(0.1, momentum=0.9), aace_jax.aace_cross_entropy),
}


def test_eight_devices():
  assert jax.device_count() == DEVICES


def data_mesh():
  return jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))


def run_pmap(step_kwargs, tx, state, batch, steps, apply_fn=mlp_apply):
  step = aace_jax.pmap_step(aace_jax.make_train_step(apply_fn, tx, axis_name="batch", **step_kwargs))
  state = aace_jax.replicate(state)
  per_device = jax.tree.map(lambda x: x.reshape(DEVICES, -1, *x.shape[1:]), batch)
  for _ in range(steps):
    state, metrics = step(state, per_device)
  return state, metrics


def run_shard(step_kwargs, tx, state, batch, steps, apply_fn=mlp_apply):
  mesh = data_mesh()
  step = aace_jax.shard_step(aace_jax.make_train_step(apply_fn, tx, axis_name="data", **step_kwargs), mesh)
  # The step donates the state: place a copy, keep the caller's arrays alive.
  state = jax.device_put(jax.tree.map(jnp.copy, state), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  for _ in range(steps):
    state, metrics = step(state, batch)
  return state, metrics


def run_single(step_kwargs, tx, state, batch, steps, apply_fn=mlp_apply):
  step = jax.jit(aace_jax.make_train_step(apply_fn, tx, **step_kwargs))
  for _ in range(steps):
    state, metrics = step(state, batch)
  return state, metrics


# Several devices sum in another order than one: results agree to float32 rounding, not bit for bit.
CLOSE = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_synchronized_perturbation_equals_one_big_batch(method):
  make_tx, perturbation_loss = METHODS[method]
  tx = make_tx()
  batch = make_batch(n=BATCH)
  params = mlp_params()
  kwargs = dict(perturbation_loss=perturbation_loss, sync_perturbation=True)
  state = aace_jax.TrainState.create(params=params, tx=tx, rng=jax.random.key(0))

  single, single_metrics = run_single(kwargs, tx, state, batch, 3)
  pmapped, pmap_metrics = run_pmap(kwargs, tx, state, batch, 3)
  sharded, shard_metrics = run_shard(kwargs, tx, state, batch, 3)

  chex.assert_trees_all_close(aace_jax.unreplicate(pmapped.params), single.params, **CLOSE)
  chex.assert_trees_all_close(sharded.params, single.params, **CLOSE)
  if method != "sgd":
    by_hand, opt_state = params, tx.init(params)
    for _ in range(3):
      by_hand, opt_state = hand_step(tx, by_hand, opt_state, batch, perturbation_loss)
    chex.assert_trees_all_close(single.params, by_hand, **CLOSE)
  for name in ("loss", "loss_at_w_adv", "accuracy", "grad_norm", "perturbation_norm"):
    np.testing.assert_allclose(pmap_metrics[name][0], single_metrics[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(shard_metrics[name], single_metrics[name], rtol=1e-5, err_msg=name)
  assert np.abs(single.params["w1"] - params["w1"]).max() > 1e-3


@pytest.mark.parametrize("runner", [run_pmap, run_shard])
def test_local_perturbation_uses_each_device_shard(runner):
  rho, lr = 0.3, 0.1
  tx = aace_jax.aace_sam(optax.sgd(lr), rho)
  batch = make_batch(n=BATCH)
  params = mlp_params()
  state = aace_jax.TrainState.create(params=params, tx=tx, rng=jax.random.key(0))
  new_state, metrics = runner(dict(sync_perturbation=False), tx, state, batch, 1)

  # By hand: device d perturbs with its own shard's AACE gradient, then the
  # CE gradients at the 8 perturbed points are averaged.
  def mean_loss(p, fn, x, y):
    return fn(mlp_apply(p, {}, x, train=True, rng=None)[0], y).mean()

  shards = [(batch["image"][8 * d : 8 * d + 8], batch["label"][8 * d : 8 * d + 8]) for d in range(DEVICES)]
  final_grads, norms = [], []
  for x, y in shards:
    g = jax.grad(mean_loss)(params, aace_jax.aace_cross_entropy, x, y)
    norms.append(rho * np.sqrt(sum(np.sum(np.square(v)) for v in jax.tree.leaves(g))))
    w_adv = jax.tree.map(lambda w, gi: w - rho * gi, params, g)
    final_grads.append(jax.grad(mean_loss)(w_adv, aace_jax.cross_entropy, x, y))
  mean_grad = jax.tree.map(lambda *gs: np.mean(gs, axis=0), *final_grads)
  expected = jax.tree.map(lambda w, g: w - lr * g, params, mean_grad)

  params_out = new_state.params if runner is run_shard else aace_jax.unreplicate(new_state.params)
  chex.assert_trees_all_close(params_out, expected, **CLOSE)
  np.testing.assert_allclose(np.ravel(metrics["perturbation_norm"])[0], np.mean(norms), rtol=1e-5)
  if runner is run_pmap:
    # Each replica keeps its own perturbation norm in its state.
    np.testing.assert_allclose(new_state.opt_state.perturbation_norm, norms, rtol=1e-5)
  # The global-batch perturbation would differ: the test can tell them apart.
  synced, _ = runner(dict(sync_perturbation=True), tx, state, batch, 1)
  synced_params = synced.params if runner is run_shard else aace_jax.unreplicate(synced.params)
  assert np.abs(np.asarray(synced_params["w1"]) - expected["w1"]).max() > 1e-6


@pytest.mark.parametrize("runner", [run_pmap, run_shard])
def test_batchnorm_statistics_are_first_pass_averaged_over_devices(runner):
  model = BatchNormNet()
  batch = make_batch(n=BATCH)
  variables = model.init(jax.random.key(0), batch["image"], train=False)
  tx = aace_jax.aace_sam(optax.sgd(0.1), 0.5)
  state = aace_jax.TrainState.create(
    params=variables["params"], model_state={"batch_stats": variables["batch_stats"]}, tx=tx, rng=jax.random.key(0)
  )
  new_state, _ = runner({}, tx, state, batch, 1, apply_fn=aace_jax.linen_apply_fn(model))
  per_shard = [first_pass_batch_stats(model, variables, batch["image"][8 * d : 8 * d + 8]) for d in range(DEVICES)]
  expected = jax.tree.map(lambda *s: np.mean(s, axis=0), *per_shard)
  stats = new_state.model_state["batch_stats"]
  if runner is run_pmap:
    stats = aace_jax.unreplicate(stats)
  chex.assert_trees_all_close(stats, expected, **CLOSE)


def test_parallel_eval_sums_equal_single_device():
  params = mlp_params()
  batch = make_batch(n=BATCH)
  batch["mask"] = (jnp.arange(BATCH) < 60).astype(jnp.float32)
  state = aace_jax.TrainState.create(params=params, tx=optax.sgd(0.1), rng=jax.random.key(0))
  single = jax.jit(aace_jax.make_eval_step(mlp_apply))(state, batch)
  sharded = aace_jax.shard_step(aace_jax.make_eval_step(mlp_apply, axis_name="data"), data_mesh())(state, batch)
  pmapped = aace_jax.pmap_step(aace_jax.make_eval_step(mlp_apply, axis_name="batch"))(
    aace_jax.replicate(state), jax.tree.map(lambda x: x.reshape(DEVICES, -1, *x.shape[1:]), batch)
  )
  for k in single:
    np.testing.assert_allclose(sharded[k], single[k], rtol=1e-5)
    np.testing.assert_allclose(pmapped[k][0], single[k], rtol=1e-5)
  assert single["count"] == 60


def test_sharded_step_is_traced_once():
  tx = aace_jax.aace_sam(optax.sgd(0.1), 0.2)
  calls = []

  def counting_apply(*args, **kwargs):
    calls.append(1)
    return mlp_apply(*args, **kwargs)

  state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  run_shard({}, tx, state, make_batch(n=BATCH), 4, apply_fn=counting_apply)
  assert len(calls) == 2  # two passes, one trace


CHEAPER = {
  "reuse every 2": (dict(perturb_every=2), {}),
  "plain steps between": (dict(perturb_every=2, reuse_perturbation=False), {}),
  "first pass on a quarter": ({}, dict(perturbation_batch_fraction=0.25)),
  "reuse with accumulation": (dict(perturb_every=3), dict(grad_accum_steps=2, perturbation_batch_fraction=0.5)),
}


@pytest.mark.parametrize("case", CHEAPER)
def test_cheaper_steps_on_devices_equal_the_single_device_run(case):
  tx_kwargs, step_kwargs = CHEAPER[case]
  tx = aace_jax.aace_sam(optax.sgd(0.1, momentum=0.9), 0.2, **tx_kwargs)
  batch = make_batch(n=BATCH)
  state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  single_batch = batch
  if "perturbation_batch_fraction" in step_kwargs:
    # Each device's first pass takes the leading part of its own shard: the single-device
    # reference gets the same examples first, by running on the batch reordered.
    per_device = BATCH // DEVICES
    first = round(step_kwargs["perturbation_batch_fraction"] * per_device)
    order = np.concatenate(
      [np.arange(d * per_device, d * per_device + first) for d in range(DEVICES)]
      + [np.arange(d * per_device + first, (d + 1) * per_device) for d in range(DEVICES)]
    )
    single_batch = jax.tree.map(lambda x: x[order], batch)
  single, _ = run_single(step_kwargs, tx, state, single_batch, 5)
  pmapped, _ = run_pmap(step_kwargs, tx, state, batch, 5)
  sharded, _ = run_shard(step_kwargs, tx, state, batch, 5)
  chex.assert_trees_all_close(aace_jax.unreplicate(pmapped.params), single.params, **CLOSE)
  chex.assert_trees_all_close(sharded.params, single.params, **CLOSE)
  assert np.abs(single.params["w1"] - mlp_params()["w1"]).max() > 1e-3


def test_a_kept_perturbation_per_device_is_refused():
  tx = aace_jax.aace_sam(optax.sgd(0.1), 0.2, perturb_every=2)
  state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="sync_perturbation=False with a kept perturbation"):
    run_shard(dict(sync_perturbation=False), tx, state, make_batch(n=BATCH), 1)
  plain = aace_jax.aace_sam(optax.sgd(0.1), 0.2, perturb_every=2, reuse_perturbation=False)
  state = aace_jax.TrainState.create(params=mlp_params(), tx=plain, rng=jax.random.key(0))
  run_shard(dict(sync_perturbation=False), plain, state, make_batch(n=BATCH), 2)  # nothing kept: allowed


def fsdp_params():
  """Six parameter vectors, each sharded over all 8 devices along its only axis (FSDP)."""
  mesh = jax.make_mesh((DEVICES,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  rng = np.random.default_rng(0)
  vectors = [jnp.asarray(rng.normal(size=8 * 64 * (i + 1)), jnp.float32) for i in range(6)]
  params = {f"w{i}": jax.device_put(vector, sharding) for i, vector in enumerate(vectors)}
  return params, sharding


@pytest.mark.parametrize("make", [aace_jax.aace_sam, aace_jax.sam])
@pytest.mark.parametrize("perturb_every", [None, 2])
def test_the_update_of_sharded_parameters_gathers_nothing(make, perturb_every):
  params, sharding = fsdp_params()
  tx = make(optax.sgd(0.1, momentum=0.9), perturb_every=perturb_every)
  state = tx.init(params)  # the optimizer state of parameter-shaped leaves is sharded like them
  grad_fn = lambda w: jax.tree.map(lambda x: 2.0 * x, w)  # elementwise: needs no communication

  def update(grads, state, params):
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  grads = jax.tree.map(lambda x: 0.5 * x, params)
  compiled = jax.jit(update).lower(grads, state, params).compile()
  hlo = compiled.as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  new_params, new_state = compiled(grads, state, params)
  for name, leaf in new_params.items():
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), name
  sharded = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(new_state) if leaf.ndim]
  assert len(sharded) == 6 * (2 if perturb_every else 1)  # momentum, and the kept perturbation
  for path, leaf in sharded:
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), path
  # The numbers equal those of the same update on one device's copy of everything.
  local = jax.device_get((grads, state, params))
  expected_params, _ = jax.jit(update, backend="cpu")(*local)
  chex.assert_trees_all_close(new_params, expected_params, **CLOSE)
  # init takes shapes alone (jax.eval_shape, or ShapeDtypeStruct leaves directly).
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assert jax.tree.structure(tx.init(shapes)) == jax.tree.structure(state)


def test_norms_and_checks_of_sharded_leaves_reduce_leaf_by_leaf():
  from aace_jax import _norms

  params, _ = fsdp_params()
  assert not _norms.concatenates()  # several devices: no concatenation
  entries = np.concatenate([np.asarray(x, np.float64) for x in jax.tree.leaves(params)])
  np.testing.assert_allclose(jax.jit(_norms.global_norm)(params), np.sqrt(np.sum(entries**2)), rtol=1e-6)
  assert bool(jax.jit(_norms.all_finite)(params))
  spoiled = {**params, "w3": params["w3"].at[5].set(jnp.inf)}
  assert not bool(jax.jit(_norms.all_finite)(spoiled))
  hlo = jax.jit(_norms.global_norm).lower(params).compile().as_text()
  assert "all-gather" not in hlo


# ---------------------------------------------------------------------------
# The whole step on a sharded state: shard_step(..., state_sharding=...).
# ---------------------------------------------------------------------------

SHARDED_STATE_METHODS = {
  **METHODS,
  "aace_sam_k2": (
    lambda: aace_jax.aace_sam(optax.sgd(0.1, momentum=0.9), 0.2, perturb_every=2),
    aace_jax.aace_cross_entropy,
  ),
}
MLP_SHAPE = dict(features=12, hidden=64, classes=8)


def auto_mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def tensor_parallel_sharding(shapes, mesh):
  """Megatron's layout of the MLP on a data x model mesh: w1 split by columns, w2 by rows; the rest replicated.

  Every leaf under a parameter's name (the parameter, its momentum, a kept perturbation) gets its layout.
  """
  specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}

  def layout(path, leaf):
    names = [getattr(key, "key", None) for key in path]
    spec = specs.get(names[-1]) if names and leaf.ndim else None
    return jax.sharding.NamedSharding(mesh, spec if spec is not None else P())

  return jax.tree_util.tree_map_with_path(layout, shapes)


def sharded_state_run(method, layout, steps=3):
  """`steps` steps of `method` with the state laid out by `layout`, the compiled step's collectives, and the layout."""
  make_tx, perturbation_loss = SHARDED_STATE_METHODS[method]
  tx = make_tx()
  if layout == "fsdp":
    mesh = auto_mesh((DEVICES,), ("data",))
    make_layout = lambda shapes: aace_jax.fsdp_sharding(shapes, mesh, "data", min_size=0)
  else:
    mesh = auto_mesh((DEVICES // 2, 2), ("data", "model"))
    make_layout = lambda shapes: tensor_parallel_sharding(shapes, mesh)
  make_state = lambda: aace_jax.TrainState.create(params=mlp_params(**MLP_SHAPE), tx=tx, rng=jax.random.key(0))
  sharding = make_layout(jax.eval_shape(make_state))  # from shapes alone: tx.init on ShapeDtypeStructs
  state = jax.jit(make_state, out_shardings=sharding)()  # created in place, never whole on one device
  step = aace_jax.make_train_step(mlp_apply, tx, perturbation_loss=perturbation_loss)
  run = aace_jax.shard_step(step, mesh, "data", state_sharding=sharding)
  batch = make_batch(n=BATCH, classes=MLP_SHAPE["classes"])
  hlo = (
    jax.jit(
      step.fn, in_shardings=(sharding, jax.sharding.NamedSharding(mesh, P("data"))), out_shardings=(sharding, None)
    )
    .lower(state, batch)
    .compile()
    .as_text()
  )
  for _ in range(steps):
    state, metrics = run(state, batch)
  collectives = {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in ("all-gather", "all-to-all", "all-reduce")}
  return state, metrics, collectives, sharding


def single_device_run(method, steps=3):
  make_tx, perturbation_loss = SHARDED_STATE_METHODS[method]
  tx = make_tx()
  state = aace_jax.TrainState.create(params=mlp_params(**MLP_SHAPE), tx=tx, rng=jax.random.key(0))
  batch = make_batch(n=BATCH, classes=MLP_SHAPE["classes"])
  return run_single({"perturbation_loss": perturbation_loss}, tx, state, batch, steps)


def assert_layout_kept(state, sharding):
  for (path, leaf), expected in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(sharding)):
    assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), jax.tree_util.keystr(path)


@pytest.mark.parametrize("method", SHARDED_STATE_METHODS)
def test_an_fsdp_state_gathers_each_parameter_once_per_pass_and_equals_one_device(method):
  state, metrics, collectives, sharding = sharded_state_run(method, "fsdp")
  # The model's own need: each of the 4 parameters, split over "data", is gathered to compute each pass
  # (two passes for a sharpness-aware step, one for SGD); the update, its norms and checks gather nothing.
  passes = 1 if method == "sgd" else 2
  assert collectives["all-gather"] == 4 * passes, collectives
  assert collectives["all-to-all"] == 0
  assert_layout_kept(state, sharding)
  kept = (
    jax.tree.leaves(aace_jax._sam.find_states(state.opt_state, aace_jax.SAMState)[0].kept_perturbation)
    if method == "aace_sam_k2"
    else []
  )
  assert len(kept) == (4 if method == "aace_sam_k2" else 0)
  expected, expected_metrics = single_device_run(method)
  chex.assert_trees_all_close(state.params, expected.params, **CLOSE)
  chex.assert_trees_all_close(metrics, expected_metrics, **CLOSE)
  assert metrics["skipped_steps"] == 0


@pytest.mark.parametrize("method", ["sgd", "aace_sam", "sam"])
def test_a_tensor_parallel_state_needs_no_gather_at_all(method):
  """On a data x model mesh with Megatron's layout the model needs only all-reduces, and so does the whole step."""
  state, metrics, collectives, sharding = sharded_state_run(method, "tensor_parallel")
  assert collectives["all-gather"] == 0 and collectives["all-to-all"] == 0, collectives
  assert_layout_kept(state, sharding)
  expected, expected_metrics = single_device_run(method)
  chex.assert_trees_all_close(state.params, expected.params, **CLOSE)
  chex.assert_trees_all_close(metrics, expected_metrics, **CLOSE)


def test_sharded_state_arguments_are_checked():
  tx = optax.sgd(0.1)
  mesh = auto_mesh((DEVICES,), ("data",))
  state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
  sharding = aace_jax.fsdp_sharding(state, mesh, min_size=0)
  replicated_step = aace_jax.make_train_step(mlp_apply, tx, axis_name="data")
  global_step = aace_jax.make_train_step(mlp_apply, tx)
  with pytest.raises(ValueError, match="averages over axis_name='data' .* build it with axis_name=None"):
    aace_jax.shard_step(replicated_step, mesh, "data", state_sharding=sharding)
  with pytest.raises(ValueError, match=r"axis_name=None, which runs on a sharded state: give its layout"):
    aace_jax.shard_step(global_step, mesh)
  with pytest.raises(ValueError, match=r"data_axis must name the mesh axis .* \('data',\); got None"):
    aace_jax.shard_step(global_step, mesh, state_sharding=sharding)
  with pytest.raises(ValueError, match=r"axes of type Auto.*\['data'\] are Explicit"):
    aace_jax.shard_step(global_step, data_mesh(), "data", state_sharding=sharding)
  with pytest.raises(ValueError, match="fsdp_sharding: mesh axes \\('data',\\) have no 'model'"):
    aace_jax.fsdp_sharding(state, mesh, "model")


def test_fsdp_sharding_splits_the_largest_divisible_dimension_of_large_arrays():
  mesh = auto_mesh((DEVICES,), ("data",))
  shapes = {
    "kernel": jax.ShapeDtypeStruct((3, 3, 16, 64), jnp.float32),
    "odd": jax.ShapeDtypeStruct((7, 9), jnp.float32),
    "small": jax.ShapeDtypeStruct((16,), jnp.float32),
    "step": jax.ShapeDtypeStruct((), jnp.int32),
    "key": jax.random.key(0),
    "keys": jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 64)),  # large and divisible, but keys
  }
  layout = jax.tree.map(lambda s: s.spec, aace_jax.fsdp_sharding(shapes, mesh, min_size=64))
  assert layout == {
    "kernel": P(None, None, None, "data"),
    "odd": P(),
    "small": P(),
    "step": P(),
    "key": P(),
    "keys": P(),
  }
