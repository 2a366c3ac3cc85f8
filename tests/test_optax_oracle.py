"""The checks optax runs on its own contributed optimizers, run on `sam` and `aace_sam`.

Restated from optax's contrib test suites (`_common_test.py`, `_sam_test.py`),
not imported from them: convergence on the parabola and the Rosenbrock
function, extra arguments without recompiling, `inject_hyperparams`, dtypes
and state stability from float16 to float64, learning-rate schedules, and,
in float64, the equivalence of `sam` with `optax.contrib.sam` in opaque mode
across base optimizers.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aace_jax
from tests.helpers import jax_mlp
from tests.helpers import make_mlp_problem
from tests.helpers import run_library

CONFIGS = {
  "aace_sam": (lambda opt: aace_jax.aace_sam(opt, 0.05), "aace"),
  "aace_sam_normalized": (lambda opt: aace_jax.aace_sam(opt, 0.05, normalize=True), "aace"),
  "aace_sam_adaptive": (lambda opt: aace_jax.aace_sam(opt, 0.05, adaptive=True), "aace"),
  "sam": (lambda opt: aace_jax.sam(opt, 0.05), "ce"),
  "asam": (lambda opt: aace_jax.sam(opt, 0.5, adaptive=True), "ce"),
  "aace_sam_in_chain": (
    lambda opt: optax.chain(optax.clip_by_global_norm(1e6), aace_jax.aace_sam(opt, 0.05)),
    "aace",
  ),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_converges_on_the_parabola(config):
  make, _ = CONFIGS[config]
  target = jnp.array([1.0, -2.0, 0.5])
  loss = lambda w: jnp.sum((w - target) ** 2)
  tx = make(optax.sgd(0.1))

  @jax.jit
  def step(w, state):
    updates, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
    return optax.apply_updates(w, updates), state

  w = jnp.array([0.3, 0.2, 0.1])  # nonzero everywhere so ASAM's T = |w| can move it
  state = tx.init(w)
  for _ in range(200):
    w, state = step(w, state)
  assert loss(w) < 1e-2, (config, w)


@pytest.mark.parametrize("config", CONFIGS)
def test_converges_on_logistic_regression(config):
  make, perturbation = CONFIGS[config]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 2))
  y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32)
  fn = aace_jax.aace_cross_entropy if perturbation == "aace" else aace_jax.cross_entropy

  def loss(params, fn):
    logits = x @ params["w"] + params["b"]
    return fn(logits, y).mean()

  tx = make(optax.sgd(0.5))
  params = {"w": jnp.full((2, 2), 0.1), "b": jnp.array([0.1, -0.1])}

  @jax.jit
  def step(params, state):
    updates, state = tx.update(
      jax.grad(loss)(params, fn),
      state,
      params,
      grad_fn=lambda w: jax.grad(loss)(w, aace_jax.cross_entropy),
    )
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  initial = loss(params, aace_jax.cross_entropy)
  for _ in range(300):
    params, state = step(params, state)
  accuracy = np.mean(np.argmax(x @ params["w"] + params["b"], -1) == y)
  assert loss(params, aace_jax.cross_entropy) < 0.5 * initial
  assert accuracy >= 0.95, (config, accuracy)


@pytest.mark.parametrize("config", CONFIGS)
def test_no_recompilation(config):
  make, _ = CONFIGS[config]
  tx = make(optax.sgd(0.1, momentum=0.9))
  loss = lambda w: jnp.sum(w**2)
  chex.clear_trace_counter()  # chex counts traces per function definition, across this test's parameters

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(w, state):
    updates, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
    return optax.apply_updates(w, updates), state

  w = jnp.ones(3)
  state = tx.init(w)
  for _ in range(3):
    w, state = step(w, state)


def test_inject_hyperparams_schedules_rho_and_learning_rate():
  rho_schedule = optax.linear_schedule(0.0, 0.3, transition_steps=4)
  lr_schedule = optax.piecewise_constant_schedule(0.1, {2: 0.2})
  tx = optax.inject_hyperparams(aace_jax.aace_sam)(
    optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=lr_schedule), rho=rho_schedule
  )
  a = jnp.array([1.0, 3.0])
  grad = lambda w: a * w  # of 0.5 * sum(a w^2)

  @jax.jit
  def step(w, state):
    updates, state = tx.update(grad(w), state, w, grad_fn=grad)
    return optax.apply_updates(w, updates), state

  w = jnp.array([1.0, -1.0])
  state = tx.init(w)
  expected = np.array([1.0, -1.0])
  for t in range(5):
    rho_t = 0.3 * min(t, 4) / 4
    lr_t = 0.1 if t < 2 else 0.02
    expected = expected - lr_t * np.array([1.0, 3.0]) * (expected - rho_t * np.array([1.0, 3.0]) * expected)
    w, state = step(w, state)
    np.testing.assert_allclose(state.hyperparams["rho"], rho_t, rtol=1e-6)
  np.testing.assert_allclose(w, expected, rtol=1e-5)


def rosenbrock(w):
  return (1.0 - w[0]) ** 2 + 100.0 * (w[1] - w[0] ** 2) ** 2


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("make", [aace_jax.aace_sam, aace_jax.sam])
def test_converges_on_the_rosenbrock_function(make, normalize, adaptive):
  # A small radius, as in optax's SAM test: SAM's fixed point lies O(rho) from
  # the minimum of this narrow valley (rho = 0.05 stops at (0.74, 0.55)), and
  # the unnormalized step w - rho g overshoots where rho times the curvature
  # (about 1000 at the minimum) exceeds 2.
  tx = make(optax.adam(0.01), 1e-4, normalize=normalize, adaptive=adaptive)

  def step(_, carry):
    w, state = carry
    updates, state = tx.update(jax.grad(rosenbrock)(w), state, w, grad_fn=jax.grad(rosenbrock))
    return optax.apply_updates(w, updates), state

  w = jnp.array([0.1, 0.1])  # optax starts at 0; ASAM's T = |w| needs a nonzero start
  state = optax.tree_utils.tree_map_params(tx, lambda v: v, tx.init(w))  # a no-op that must work
  w, _ = jax.jit(lambda w, state: jax.lax.fori_loop(0, 10_000, step, (w, state)))(w, state)
  np.testing.assert_allclose(w, [1.0, 1.0], atol=3e-2)


class ScaleByExtraArg(optax.GradientTransformationExtraArgs):
  """A base optimizer that reads an extra argument, `factor`, on every update."""

  def __new__(cls):
    return super().__new__(
      cls,
      lambda params: optax.EmptyState(),
      lambda g, s, p=None, *, factor, **_: (jax.tree.map(lambda x: -factor * x, g), s),
    )


@pytest.mark.parametrize("make", [aace_jax.aace_sam, aace_jax.sam])
def test_extra_args_reach_the_base_optimizer_without_recompiling(make):
  tx = make(ScaleByExtraArg(), 0.1)
  loss = lambda w: 0.5 * jnp.sum(w**2)
  chex.clear_trace_counter()  # chex counts traces per function definition, across this test's parameters

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(w, state, factor):
    return tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss), factor=factor)

  w = jnp.array([1.0, -2.0])
  state = tx.init(w)
  for factor in (1.0, 2.0, 3.0):
    updates, state = step(w, state, jnp.asarray(factor))
    w_adv = w - 0.1 * w if make is aace_jax.aace_sam else w + 0.1 * w / jnp.linalg.norm(w)
    np.testing.assert_allclose(updates, -factor * w_adv, rtol=1e-6)


@pytest.mark.parametrize("config", CONFIGS)
def test_inject_hyperparams_gives_the_same_updates_and_state(config):
  make, _ = CONFIGS[config]
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
  grad_fn = lambda w: jax.tree.map(lambda x: 0.5 * x, w)
  plain = make(optax.sgd(0.1, momentum=0.9))
  injected = optax.inject_hyperparams(lambda rho: make(optax.sgd(0.1, momentum=0.9)))(rho=0.0)
  # The injected factory above ignores rho: only the wrapping is under test.
  updates, state = jax.jit(lambda g, s, p: plain.update(g, s, p, grad_fn=grad_fn))(grads, plain.init(params), params)
  updates_i, state_i = jax.jit(lambda g, s, p: injected.update(g, s, p, grad_fn=grad_fn))(
    grads, injected.init(params), params
  )
  chex.assert_trees_all_close((updates_i, state_i.inner_state), (updates, state), rtol=1e-6)


@pytest.mark.filterwarnings("ignore:.*rounded to their dtype")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS)
def test_dtypes_and_state_are_stable_across_steps(config, dtype):
  make, _ = CONFIGS[config]
  with jax.enable_x64(dtype == "float64"):
    tx = make(optax.sgd(0.1, momentum=0.9))
    w = jnp.array([0.5, -1.0, 2.0], dtype)
    loss = lambda v: jnp.sum(v.astype(jnp.float32) ** 2)
    state = tx.init(w)
    layout = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), state)
    step = jax.jit(lambda w, s: tx.update(jax.grad(loss)(w), s, w, grad_fn=jax.grad(loss)))
    for _ in range(2):
      updates, state = step(w, state)
      assert updates.dtype == jnp.dtype(dtype)
      w = optax.apply_updates(w, updates)
      assert w.dtype == jnp.dtype(dtype)
      assert jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), state) == layout


@pytest.mark.parametrize("make", [aace_jax.aace_sam, aace_jax.sam])
def test_base_optimizer_learning_rate_schedule(make):
  # 0.5 * a w^2 with a = 2: g(w) = 2 w; the schedule halves the rate at step 2.
  schedule = optax.piecewise_constant_schedule(0.1, {2: 0.5})
  tx = make(optax.sgd(schedule), 0.1)
  grad = lambda w: 2.0 * w
  w = jnp.array([1.0, -3.0])
  state = tx.init(w)
  expected = np.array([1.0, -3.0])
  step = jax.jit(lambda w, s: tx.update(grad(w), s, w, grad_fn=grad))
  for t in range(4):
    g = 2.0 * expected
    w_adv = expected - 0.1 * g if make is aace_jax.aace_sam else expected + 0.1 * g / np.linalg.norm(g)
    expected = expected - (0.1 if t < 2 else 0.05) * 2.0 * w_adv
    updates, state = step(w, state)
    w = optax.apply_updates(w, updates)
  np.testing.assert_allclose(w, expected, rtol=1e-6)


BASE_OPTIMIZERS = {
  "sgd": lambda: optax.sgd(0.1),
  "momentum": lambda: optax.sgd(0.1, momentum=0.9),
  "nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
  "adam": lambda: optax.adam(0.01),
  "adamw": lambda: optax.adamw(0.01, weight_decay=0.1),
  "lion": lambda: optax.lion(0.001),
  "weight_decay_then_sgd": lambda: optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1)),
}


@pytest.mark.parametrize("base", BASE_OPTIMIZERS)
def test_sam_equals_optax_contrib_sam_in_opaque_mode_float64(base):
  params, x, y = make_mlp_problem(seed=2)
  rho = 0.05

  def batch_loss(params):
    return aace_jax.cross_entropy(jax_mlp(params, x), y).mean()

  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, params)
    ours, _ = run_library(aace_jax.sam(BASE_OPTIMIZERS[base](), rho, eps=0.0), params, x, y, 5, aace_jax.cross_entropy)
    contrib = optax.contrib.sam(
      BASE_OPTIMIZERS[base](), optax.chain(optax.contrib.normalize(), optax.sgd(rho)), sync_period=2, opaque_mode=True
    )

    @jax.jit
    def step(params, state):
      updates, state = contrib.update(
        jax.grad(batch_loss)(params), state, params, grad_fn=lambda w, _: jax.grad(batch_loss)(w)
      )
      return optax.apply_updates(params, updates), state

    theirs, state = params, contrib.init(params)
    for _ in range(5):
      theirs, state = step(theirs, state)
    for k in ours:
      assert ours[k].dtype == jnp.float64
      np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-12, atol=1e-14, err_msg=k)
    assert np.abs(np.asarray(ours["w2"]) - np.asarray(params["w2"])).max() > 1e-4


def test_aace_sam_equals_optax_contrib_sam_fed_aace_gradients():
  params, x, y = make_mlp_problem(seed=1)
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  ours, _ = run_library(
    aace_jax.aace_sam(optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)), 0.2),
    params,
    x,
    y,
    10,
    aace_jax.aace_cross_entropy,
  )
  contrib = optax.contrib.sam(
    optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)),
    optax.scale(0.2),
    sync_period=2,
    opaque_mode=True,
  )

  def batch_loss(params, fn):
    return fn(jax_mlp(params, x), y).mean()

  @jax.jit
  def step(params, state):
    grads = jax.grad(batch_loss)(params, aace_jax.aace_cross_entropy)
    grad_fn = lambda w, _: jax.grad(batch_loss)(w, aace_jax.cross_entropy)
    updates, state = contrib.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  state = contrib.init(params)
  theirs = params
  for _ in range(10):
    theirs, state = step(theirs, state)
  for k in ours:
    np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert np.abs(ours["w2"] - params["w2"]).max() > 1e-3
