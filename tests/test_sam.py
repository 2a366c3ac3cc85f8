"""`aace_sam` and `sam` against the authors' update restated in NumPy, and as optax citizens."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aace_jax

# ---------------------------------------------------------------------------
# A NumPy restatement of the authors' step (method.md), float64, by hand.
# ---------------------------------------------------------------------------


def np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_mlp_grads(params, x, y, loss):
  """Gradient of the batch-mean loss of a tanh MLP, back-propagated by hand."""
  hidden = np.tanh(x @ params["w1"] + params["b1"])
  logits = hidden @ params["w2"] + params["b2"]
  p = np_softmax(logits)
  onehot = np.eye(logits.shape[-1])[y]
  if loss == "aace":  # th = 0, ada: dL/dz = p - q, q the softmax over the other classes.
    other = p * (1 - onehot)
    target = other / other.sum(-1, keepdims=True)
  else:
    target = onehot
  dz = (p - target) / len(x)
  dh = dz @ params["w2"].T * (1 - hidden**2)
  return {
      "w1": x.T @ dh,
      "b1": dh.sum(0),
      "w2": hidden.T @ dz,
      "b2": dz.sum(0),
  }


def np_authors_training(params, x, y, steps, rho, *, perturbation_loss, ascent, normalize, adaptive):
  """SAM.first_step / second_step and torch SGD(lr 0.1, momentum 0.9, wd 5e-4)."""
  lr, momentum, wd = 0.1, 0.9, 5e-4
  params = {k: v.copy() for k, v in params.items()}
  buffers = None
  for _ in range(steps):
    g = np_mlp_grads(params, x, y, perturbation_loss)
    scale_t = {k: (np.abs(params[k]) if adaptive else 1.0) for k in params}
    grad_norm = np.sqrt(sum(np.sum((scale_t[k] * g[k]) ** 2) for k in g))
    scale = rho / (grad_norm + 1e-12) if normalize else rho
    sign = 1.0 if ascent else -1.0
    e = {k: sign * (scale_t[k] ** 2) * g[k] * scale for k in g}
    perturbed = {k: params[k] + e[k] for k in params}
    g2 = np_mlp_grads(perturbed, x, y, "ce")
    d = {k: g2[k] + wd * params[k] for k in params}
    buffers = d if buffers is None else {k: momentum * buffers[k] + d[k] for k in d}
    params = {k: params[k] - lr * buffers[k] for k in params}
  return params, grad_norm, np.sqrt(sum(np.sum(v**2) for v in e.values()))


def jax_mlp(params, x):
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  return hidden @ params["w2"] + params["b2"]


def make_mlp_problem(seed=0, batch=16, features=5, hidden=7, classes=4):
  rng = np.random.default_rng(seed)
  params = {
      "w1": rng.normal(size=(features, hidden)) * 0.8,
      "b1": rng.normal(size=hidden) * 0.1,
      "w2": rng.normal(size=(hidden, classes)) * 0.8,
      "b2": rng.normal(size=classes) * 0.1,
  }
  x = rng.normal(size=(batch, features))
  y = rng.integers(0, classes, size=batch)
  return params, x, y


def run_library(tx, params, x, y, steps, perturbation_loss):
  def batch_loss(params, fn):
    return fn(jax_mlp(params, x), y).mean()

  @jax.jit
  def step(params, state):
    grads = jax.grad(batch_loss)(params, perturbation_loss)
    updates, state = tx.update(
        grads, state, params, grad_fn=jax.grad(lambda w: batch_loss(w, aace_jax.cross_entropy))
    )
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def base_optimizer():
  return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("method", ["aace_sam", "sam"])
def test_parity_with_authors_update_float64(method, normalize, adaptive):
  params, x, y = make_mlp_problem()
  if method == "aace_sam":
    rho, loss, fn = 0.2, "aace", aace_jax.aace_cross_entropy
    tx = aace_jax.aace_sam(base_optimizer(), rho, normalize=normalize, adaptive=adaptive)
  else:
    rho, loss, fn = 0.05, "ce", aace_jax.cross_entropy
    tx = aace_jax.sam(base_optimizer(), rho, normalize=normalize, adaptive=adaptive)
  expected, grad_norm, perturbation_norm = np_authors_training(
      params, x, y, 5, rho, perturbation_loss=loss, ascent=method == "sam",
      normalize=normalize, adaptive=adaptive,
  )
  with jax.enable_x64(True):
    got, state = run_library(tx, jax.tree.map(jnp.asarray, params), x, y, 5, fn)
    got = jax.tree.map(np.asarray, got)
  for k in expected:
    assert got[k].dtype == np.float64
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-12, atol=1e-12, err_msg=k)
  # The state's logged norms are those of the last step (stored as float32).
  np.testing.assert_allclose(state.perturbation_grad_norm, grad_norm, rtol=1e-6)
  np.testing.assert_allclose(state.perturbation_norm, perturbation_norm, rtol=1e-6)


def test_parameters_actually_move():
  # Guards the parity test against comparing two frozen copies.
  params, x, y = make_mlp_problem()
  expected, _, _ = np_authors_training(
      params, x, y, 5, 0.2, perturbation_loss="aace", ascent=False, normalize=False, adaptive=False
  )
  assert np.abs(expected["w1"] - params["w1"]).max() > 1e-3


def test_equivalent_to_optax_contrib_sam_opaque_mode():
  params, x, y = make_mlp_problem(seed=1)
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  ours, _ = run_library(
      aace_jax.aace_sam(base_optimizer(), 0.2), params, x, y, 10, aace_jax.aace_cross_entropy
  )
  contrib = optax.contrib.sam(
      base_optimizer(), optax.scale(0.2), sync_period=2, opaque_mode=True
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


# ---------------------------------------------------------------------------
# Numerical safety and dtypes.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-12, 0.0])
@pytest.mark.parametrize("make", [aace_jax.aace_sam, aace_jax.sam])
def test_zero_gradient_gives_zero_perturbation(make, eps):
  tx = make(optax.sgd(1.0), 0.5, normalize=True, eps=eps)
  params = {"a": jnp.ones(3), "b": jnp.full((2, 2), 2.0)}
  seen = []

  def grad_fn(w):
    seen.append(w)
    return jax.tree.map(jnp.ones_like, w)

  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params, grad_fn=grad_fn)
  np.testing.assert_array_equal(seen[0]["a"], params["a"])
  np.testing.assert_array_equal(seen[0]["b"], params["b"])
  assert state.perturbation_norm == 0 and state.perturbation_grad_norm == 0
  np.testing.assert_array_equal(updates["a"], -np.ones(3))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("normalize", [False, True])
def test_dtypes_are_preserved(dtype, normalize):
  params = {"w": jnp.full((4,), 0.5, dtype), "b": jnp.zeros((), dtype)}
  tx = aace_jax.aace_sam(optax.sgd(0.1, momentum=0.9), 0.2, normalize=normalize, adaptive=True)
  seen = []

  def grad_fn(w):
    seen.append(jax.tree.map(lambda v: v.dtype, w))
    return jax.tree.map(lambda v: v * 2, w)

  grads = jax.tree.map(lambda v: jnp.full_like(v, 1e-3), params)
  updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))(grads, tx.init(params), params)
  assert seen[0] == {"w": dtype, "b": dtype}
  assert jax.tree.map(lambda v: v.dtype, updates) == {"w": dtype, "b": dtype}
  assert state.perturbation_norm.dtype == jnp.float32
  # ||T g|| = sqrt(4) * 0.5 * 1e-3 (b is 0, so T zeroes its entry): no overflow or underflow.
  np.testing.assert_allclose(state.perturbation_grad_norm, 1e-3, rtol=1e-2)
  assert np.isfinite(np.asarray(state.perturbation_norm))


# ---------------------------------------------------------------------------
# Optax citizenship: one shared suite over every configuration.
# ---------------------------------------------------------------------------

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
def test_converges_on_quadratic(config):
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
        jax.grad(loss)(params, fn), state, params,
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
  traces = []
  loss = lambda w: jnp.sum(w**2)

  @jax.jit
  def step(w, state):
    traces.append(1)
    updates, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
    return optax.apply_updates(w, updates), state

  w = jnp.ones(3)
  state = tx.init(w)
  for _ in range(3):
    w, state = step(w, state)
  assert len(traces) == 1


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


def test_inside_multisteps_accumulates_the_perturbation_gradient():
  # k = 2 micro-batches: the perturbation uses the mean of both perturbation
  # gradients; grad_fn is called with the micro-batch of the emitting call.
  tx = optax.MultiSteps(aace_jax.aace_sam(optax.sgd(0.1), 0.5), every_k_schedule=2)
  w = jnp.array([1.0, 2.0])
  state = tx.init(w)
  pert_grads = [jnp.array([1.0, 0.0]), jnp.array([0.0, 3.0])]
  train_scales = [jnp.array([2.0, 2.0]), jnp.array([1.0, -1.0])]

  updates, state = tx.update(pert_grads[0], state, w, grad_fn=lambda v: train_scales[0] * v)
  np.testing.assert_array_equal(updates, [0.0, 0.0])
  w = optax.apply_updates(w, updates)
  updates, state = tx.update(pert_grads[1], state, w, grad_fn=lambda v: train_scales[1] * v)
  w_adv = np.array([1.0, 2.0]) - 0.5 * np.array([0.5, 1.5])
  np.testing.assert_allclose(updates, -0.1 * np.array([1.0, -1.0]) * w_adv, rtol=1e-6)
  np.testing.assert_allclose(
      state.inner_opt_state.perturbation_grad_norm, np.hypot(0.5, 1.5), rtol=1e-6
  )


def test_batch_axis_name_averages_both_gradients():
  # vmap with an axis name stands in for 4 devices holding 4 shards.
  params, x, y = make_mlp_problem(batch=16)
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  xs, ys = x.reshape(4, 4, -1), y.reshape(4, 4)
  tx = aace_jax.aace_sam(optax.sgd(0.1), 0.2, batch_axis_name="batch")

  def per_device(params, state, x, y):
    loss = lambda w, fn: fn(jax_mlp(w, x), y).mean()
    grads = jax.grad(loss)(params, aace_jax.aace_cross_entropy)
    updates, state = tx.update(grads, state, params, grad_fn=lambda w: jax.grad(loss)(w, aace_jax.cross_entropy))
    return optax.apply_updates(params, updates)

  state = tx.init(params)
  sharded = jax.vmap(per_device, in_axes=(None, None, 0, 0), axis_name="batch")(params, state, xs, ys)
  single, _ = run_library(aace_jax.aace_sam(optax.sgd(0.1), 0.2), params, x, y, 1, aace_jax.aace_cross_entropy)
  for k in single:
    for device in range(4):
      np.testing.assert_allclose(sharded[k][device], single[k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def test_missing_grad_fn_is_a_clear_error():
  tx = aace_jax.aace_sam(optax.sgd(0.1))
  w = jnp.ones(2)
  with pytest.raises(TypeError, match="aace_sam.update needs grad_fn="):
    tx.update(w, tx.init(w), w)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(w, tx.init(w), grad_fn=lambda v: v)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rho=-0.1), ValueError, r"rho must lie in \[0.0, inf\], got -0.1"),
        (dict(rho=optax.constant_schedule(0.1)), TypeError, "inject_hyperparams"),
        (dict(eps=-1.0), ValueError, "eps must lie in"),
        (dict(normalize=1), TypeError, "normalize must be a bool, got 1"),
        (dict(adaptive="yes"), TypeError, "adaptive must be a bool"),
    ],
)
@pytest.mark.parametrize("make", [aace_jax.aace_sam, aace_jax.sam])
def test_bad_arguments(make, kwargs, error, match):
  with pytest.raises(error, match=match):
    make(optax.sgd(0.1), **kwargs)


def test_optimizer_must_be_a_transformation():
  with pytest.raises(TypeError, match="optax.GradientTransformation, got 0.1"):
    aace_jax.aace_sam(0.1)
