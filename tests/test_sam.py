"""`aace_sam` and `sam` against the authors' update restated in NumPy, and composed with the rest of Optax."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import aace_jax
from tests.helpers import jax_mlp
from tests.helpers import make_mlp_problem
from tests.helpers import np_softmax
from tests.helpers import run_library

# ---------------------------------------------------------------------------
# A NumPy restatement of the authors' step (method.md), float64, by hand.
# ---------------------------------------------------------------------------


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


def np_authors_training(params, x, y, steps, rho, *, perturbation_loss, ascent, normalize, adaptive, max_norm=None):
  """SAM.first_step / second_step and torch SGD(lr 0.1, momentum 0.9, wd 5e-4); `max_norm` shortens a longer e."""
  lr, momentum, wd = 0.1, 0.9, 5e-4
  params = {k: v.copy() for k, v in params.items()}
  buffers = None
  for _ in range(steps):
    g = np_mlp_grads(params, x, y, perturbation_loss)
    # ASAM's authors: T = |w| + eta on the weights ("weight" in the name), 1 on the biases.
    scale_t = {k: (np.abs(params[k]) + ASAM_ETA if adaptive and k.startswith("w") else 1.0) for k in params}
    grad_norm = np.sqrt(sum(np.sum((scale_t[k] * g[k]) ** 2) for k in g))
    scale = rho / (grad_norm + 1e-12) if normalize else rho
    sign = 1.0 if ascent else -1.0
    e = {k: sign * (scale_t[k] ** 2) * g[k] * scale for k in g}
    e_norm = np.sqrt(sum(np.sum(v**2) for v in e.values()))
    if max_norm is not None and e_norm > max_norm:
      e = {k: v * (max_norm / e_norm) for k, v in e.items()}
    perturbed = {k: params[k] + e[k] for k in params}
    g2 = np_mlp_grads(perturbed, x, y, "ce")
    d = {k: g2[k] + wd * params[k] for k in params}
    buffers = d if buffers is None else {k: momentum * buffers[k] + d[k] for k in d}
    params = {k: params[k] - lr * buffers[k] for k in params}
  return params, grad_norm, np.sqrt(sum(np.sum(v**2) for v in e.values()))


ASAM_ETA = 0.01
MLP_WEIGHTS = {"w1": True, "b1": False, "w2": True, "b2": False}


def base_optimizer():
  return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))


class AuthorsUpdateTest(chex.TestCase):
  """Five updates of `aace_sam` / `sam` against the authors' step in NumPy, float64, jitted and not."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(method=("aace_sam", "sam"), normalize=(False, True), adaptive=(False, True))
  def test_parity_with_authors_update_float64(self, method, normalize, adaptive):
    params, x, y = make_mlp_problem()
    if method == "aace_sam":
      rho, loss, fn = 0.2, "aace", aace_jax.aace_cross_entropy
    else:
      rho, loss, fn = 0.05, "ce", aace_jax.cross_entropy
    make = getattr(aace_jax, method)
    tx = make(base_optimizer(), rho, normalize=normalize, adaptive=adaptive, adaptive_mask=MLP_WEIGHTS)
    expected, grad_norm, perturbation_norm = np_authors_training(
      params, x, y, 5, rho, perturbation_loss=loss, ascent=method == "sam", normalize=normalize, adaptive=adaptive
    )
    with jax.enable_x64(True):
      got, state = run_library(tx, jax.tree.map(jnp.asarray, params), x, y, 5, fn, transform=self.variant)
      got = jax.tree.map(np.asarray, got)
    for k in expected:
      assert got[k].dtype == np.float64
      np.testing.assert_allclose(got[k], expected[k], rtol=1e-12, atol=1e-12, err_msg=k)
    # The state's logged norms are those of the last step (stored as float32).
    np.testing.assert_allclose(state.first_pass_grad_norm, grad_norm, rtol=1e-6)
    np.testing.assert_allclose(state.perturbation_norm, perturbation_norm, rtol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("method", ["aace_sam", "sam"])
def test_max_perturbation_norm_shortens_only_longer_perturbations(method, adaptive):
  params, x, y = make_mlp_problem()
  rho, loss, fn = (
    (0.2, "aace", aace_jax.aace_cross_entropy) if method == "aace_sam" else (5.0, "ce", aace_jax.cross_entropy)
  )
  make = getattr(aace_jax, method)
  _, _, free_norm = np_authors_training(
    params, x, y, 1, rho, perturbation_loss=loss, ascent=method == "sam", normalize=False, adaptive=adaptive
  )
  for cap in (free_norm / 3, free_norm * 3):  # binding, then not
    expected, _, perturbation_norm = np_authors_training(
      params,
      x,
      y,
      5,
      rho,
      perturbation_loss=loss,
      ascent=method == "sam",
      normalize=False,
      adaptive=adaptive,
      max_norm=cap,
    )
    tx = make(
      base_optimizer(), rho, normalize=False, adaptive=adaptive, adaptive_mask=MLP_WEIGHTS, max_perturbation_norm=cap
    )
    with jax.enable_x64(True):
      got, state = run_library(tx, jax.tree.map(jnp.asarray, params), x, y, 5, fn)
    for k in expected:
      np.testing.assert_allclose(np.asarray(got[k]), expected[k], rtol=1e-12, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(state.perturbation_norm, perturbation_norm, rtol=1e-6)
  assert perturbation_norm < free_norm * 3  # the last cap did not bind: the free run's perturbation
  capped = make(
    base_optimizer(),
    rho,
    normalize=False,
    adaptive=adaptive,
    adaptive_mask=MLP_WEIGHTS,
    max_perturbation_norm=free_norm / 3,
  )
  with jax.enable_x64(True):
    _, state = run_library(capped, jax.tree.map(jnp.asarray, params), x, y, 1, fn)
  np.testing.assert_allclose(state.perturbation_norm, free_norm / 3, rtol=1e-6)


def test_parameters_actually_move():
  # Guards the parity test against comparing two frozen copies.
  params, x, y = make_mlp_problem()
  expected, _, _ = np_authors_training(
    params, x, y, 5, 0.2, perturbation_loss="aace", ascent=False, normalize=False, adaptive=False
  )
  assert np.abs(expected["w1"] - params["w1"]).max() > 1e-3


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
  assert state.perturbation_norm == 0 and state.first_pass_grad_norm == 0
  np.testing.assert_array_equal(updates["a"], -np.ones(3))


def test_asam_selects_flax_weights_and_leaves_biases():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(nn.BatchNorm(use_running_average=True)(nn.Embed(5, 3)(x)))

  params = Net().init(jax.random.key(0), jnp.zeros((1,), jnp.int32))["params"]
  assert aace_jax.named_weights(params) == {
    "Embed_0": {"embedding": True},
    "BatchNorm_0": {"scale": True, "bias": False},
    "Dense_0": {"kernel": True, "bias": False},
  }


@pytest.mark.parametrize("make", [aace_jax.aace_sam, aace_jax.sam])
def test_asam_perturbs_leaves_that_start_at_zero(make):
  """T = |w| + eta on weights, 1 on biases (ASAM's authors): zero-initialized leaves move; T = |w| never moves them."""
  params = {"kernel": jnp.array([0.0, 2.0, -1.0]), "bias": jnp.zeros(2)}
  g = {"kernel": jnp.array([1.0, -0.5, 0.25]), "bias": jnp.array([0.3, -0.4])}
  rho, sign = 0.1, (-1.0 if make is aace_jax.aace_sam else 1.0)
  # By hand, eta = 0.01 (the default): T_kernel = [0.01, 2.01, 1.01], T_bias = 1.
  t = {"kernel": np.array([0.01, 2.01, 1.01]), "bias": np.ones(2)}
  t_g_norm = np.sqrt(sum(np.sum((t[k] * np.asarray(g[k])) ** 2) for k in g))
  expected = {k: np.asarray(params[k]) + sign * rho * t[k] ** 2 * np.asarray(g[k]) / t_g_norm for k in g}
  seen = []

  def grad_fn(w):
    seen.append(w)
    return w

  tx = make(optax.sgd(0.1), rho, normalize=True, adaptive=True, eps=0.0)
  _, state = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
  for k in expected:
    np.testing.assert_allclose(seen[0][k], expected[k], rtol=1e-6, err_msg=k)
  np.testing.assert_allclose(state.first_pass_grad_norm, t_g_norm, rtol=1e-6)
  assert np.all(seen[0]["bias"] != 0) and seen[0]["kernel"][0] != 0
  # T = |w| everywhere (eta = 0, every leaf scaled): the leaves at zero stay there.
  seen.clear()
  plain = make(optax.sgd(0.1), rho, normalize=True, adaptive=True, eps=0.0, adaptive_eta=0.0, adaptive_mask=True)
  plain.update(g, plain.init(params), params, grad_fn=grad_fn)
  np.testing.assert_array_equal(seen[0]["bias"], np.zeros(2))
  assert seen[0]["kernel"][0] == 0


@pytest.mark.filterwarnings("ignore:.*rounded to their dtype")
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
  # ||T g|| = sqrt(4 * 0.51**2 + 0.01**2) * 1e-3 (T = |w| + 0.01): no overflow or underflow.
  np.testing.assert_allclose(state.first_pass_grad_norm, 1.02e-3, rtol=1e-2)
  assert np.isfinite(np.asarray(state.perturbation_norm))


# ---------------------------------------------------------------------------
# Composition with the rest of Optax.
# ---------------------------------------------------------------------------


def test_multisteps_and_masked_are_refused_with_a_pointer():
  w = jnp.array([1.0, 2.0])
  multi = optax.MultiSteps(aace_jax.aace_sam(optax.sgd(0.1), 0.5), every_k_schedule=2)
  with pytest.raises(ValueError, match=r"inside optax.MultiSteps.*grad_accum_steps"):
    multi.update(w, multi.init(w), w, grad_fn=lambda v: v)
  params = {"w": w, "b": jnp.ones(())}
  masked = optax.masked(aace_jax.sam(optax.sgd(0.1)), {"w": True, "b": False})
  with pytest.raises(TypeError, match=r"optax.masked.*perturb_mask="):
    masked.update(params, masked.init(params), params, grad_fn=lambda v: v)


@pytest.mark.parametrize("as_function", [False, True])
def test_perturb_mask_leaves_unmasked_parameters_at_w(as_function):
  # loss = 0.5 * (a w^2 + c b^2): g = (a w, c b). Only w is perturbed, so with
  # normalization e_w = rho * a w / |a w| and the update of b uses c * b.
  params = {"w": jnp.array([3.0, -4.0]), "b": jnp.array(2.0)}
  mask = {"w": True, "b": False}
  a, c, rho = 2.0, 5.0, 0.5
  grad = lambda p: {"w": a * p["w"], "b": c * p["b"]}
  tx = aace_jax.sam(optax.sgd(1.0), rho, perturb_mask=(lambda p: mask) if as_function else mask)
  seen = []

  def grad_fn(p):
    seen.append(p)
    return grad(p)

  updates, state = tx.update(grad(params), tx.init(params), params, grad_fn=grad_fn)
  e_w = rho * np.array([6.0, -8.0]) / 10.0
  np.testing.assert_allclose(seen[0]["w"], [3.0, -4.0] + e_w, rtol=1e-6)
  assert float(seen[0]["b"]) == 2.0
  np.testing.assert_allclose(updates["w"], -a * (np.array([3.0, -4.0]) + e_w), rtol=1e-6)
  np.testing.assert_allclose(updates["b"], -c * 2.0, rtol=1e-6)
  np.testing.assert_allclose(state.first_pass_grad_norm, 10.0, rtol=1e-6)  # |g_w|, b left out
  np.testing.assert_allclose(state.perturbation_norm, rho, rtol=1e-6)


def test_perturb_mask_errors_name_the_bad_value():
  params = {"w": jnp.ones(2), "b": jnp.ones(())}
  with pytest.raises(TypeError, match=r"Python bools.*got 1 at \['w'\]"):
    aace_jax.aace_sam(optax.sgd(0.1), perturb_mask={"w": 1, "b": True})
  computed = aace_jax.aace_sam(optax.sgd(0.1), perturb_mask=lambda p: {"w": True, "b": 0})
  with pytest.raises(TypeError, match=r"Python bools.*got 0 at \['b'\]"):
    computed.update(params, computed.init(params), params, grad_fn=lambda p: p)
  tx = aace_jax.aace_sam(optax.sgd(0.1), perturb_mask={"x": True})
  with pytest.raises(ValueError, match="perturb_mask must have the structure of params"):
    tx.update(params, tx.init(params), params, grad_fn=lambda p: p)


def _quadratic_problem():
  a = jnp.array([1.0, 3.0])
  loss = lambda w: 0.5 * jnp.sum(a * w**2)
  return a, loss, jnp.array([1.0, -1.0])


@pytest.mark.parametrize("form", ["grad", "value_and_grad", "value_and_grad_has_aux", "grad_has_aux"])
def test_grad_fn_may_return_the_loss_without_a_third_pass(form):
  a, loss, w = _quadratic_problem()
  with_aux = lambda v: (loss(v), {"anything": jnp.ones(3)})
  grad_fn = {
    "grad": jax.grad(loss),
    "value_and_grad": jax.value_and_grad(loss),
    "value_and_grad_has_aux": jax.value_and_grad(with_aux, has_aux=True),
    "grad_has_aux": jax.grad(with_aux, has_aux=True),
  }[form]
  tx = aace_jax.aace_sam(optax.sgd(0.1), 0.2)
  updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))(a * w, tx.init(w), w)
  w_adv = np.array([1.0, -1.0]) - 0.2 * np.array([1.0, -3.0])  # w - rho * a w
  np.testing.assert_allclose(updates, -0.1 * np.array([1.0, 3.0]) * w_adv, rtol=1e-6)
  np.testing.assert_allclose(state.grad_norm_at_w_adv, np.linalg.norm(np.array([1.0, 3.0]) * w_adv), rtol=1e-6)
  if form.startswith("value_and_grad"):
    np.testing.assert_allclose(state.loss_at_w_adv, 0.5 * np.sum(np.array([1.0, 3.0]) * w_adv**2), rtol=1e-6)
  else:
    assert np.isnan(state.loss_at_w_adv)


@pytest.mark.parametrize(
  "returned, match",
  [
    (lambda w: {"w": w}, r"structure and shapes of params"),
    (lambda w: w[:1], r"shapes \[\(1,\)\]"),
    (lambda w: (jnp.ones(2), w), r"value of shape \(2,\)"),
  ],
)
def test_grad_fn_of_another_shape_is_a_clear_error(returned, match):
  w = jnp.ones(2)
  tx = aace_jax.aace_sam(optax.sgd(0.1))
  with pytest.raises(ValueError, match=match):
    tx.update(w, tx.init(w), w, grad_fn=returned)


def test_clipping_before_acts_on_the_perturbation_and_inside_on_the_update():
  a, loss, w = _quadratic_problem()
  g = a * w  # (1, -3), norm sqrt(10)
  clipped = lambda v: v * min(1.0, 1.0 / np.linalg.norm(v))
  grad_fn = jax.grad(loss)

  before = optax.chain(optax.clip_by_global_norm(1.0), aace_jax.aace_sam(optax.sgd(1.0), 0.2))
  updates, _ = before.update(g, before.init(w), w, grad_fn=grad_fn)
  w_adv = np.array([1.0, -1.0]) - 0.2 * clipped(np.array([1.0, -3.0]))
  np.testing.assert_allclose(updates, -np.array([1.0, 3.0]) * w_adv, rtol=1e-6)

  inside = aace_jax.aace_sam(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), 0.2)
  updates, _ = inside.update(g, inside.init(w), w, grad_fn=grad_fn)
  w_adv = np.array([1.0, -1.0]) - 0.2 * np.array([1.0, -3.0])
  np.testing.assert_allclose(updates, -clipped(np.array([1.0, 3.0]) * w_adv), rtol=1e-6)


def test_apply_if_finite_inside_sees_the_gradient_at_w_adv():
  w = jnp.array([1.0, 2.0])
  nan_at_w_adv = lambda v: jnp.where(jnp.all(v == w), 1.0, jnp.nan) * v
  outside = optax.apply_if_finite(aace_jax.aace_sam(optax.sgd(0.1), 0.2), 3)
  updates, state = outside.update(w, outside.init(w), w, grad_fn=nan_at_w_adv)
  assert np.isnan(updates).all() and int(state.total_notfinite) == 0  # the documented trap

  inside = aace_jax.aace_sam(optax.apply_if_finite(optax.sgd(0.1), 3), 0.2)
  updates, state = inside.update(w, inside.init(w), w, grad_fn=nan_at_w_adv)
  np.testing.assert_array_equal(updates, [0.0, 0.0])
  assert int(state.inner_state.total_notfinite) == 1


def test_low_precision_parameters_warn_and_report_the_applied_perturbation():
  w = jnp.full((4,), 256.0, jnp.bfloat16)  # bfloat16 spacing at 256 is 2
  tx = aace_jax.aace_sam(optax.sgd(0.1), 0.05)
  seen = []

  def grad_fn(v):
    seen.append(v)
    return v

  with pytest.warns(UserWarning, match=r"bfloat16 hold w_adv = w \+ e rounded"):
    _, state = tx.update(jnp.ones(4, jnp.bfloat16), tx.init(w), w, grad_fn=grad_fn)
  np.testing.assert_array_equal(np.asarray(seen[0], np.float32), np.full(4, 256.0))
  assert float(state.perturbation_norm) == 0.0  # rho * |g| = 0.1 was asked, nothing applied


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
    (dict(max_perturbation_norm=-1.0), ValueError, r"max_perturbation_norm must lie in \[0.0, inf\], got -1.0"),
    (dict(normalize=1), TypeError, "normalize must be a bool, got 1"),
    (dict(adaptive="yes"), TypeError, "adaptive must be a bool"),
    (dict(adaptive_eta=-0.01), ValueError, r"adaptive_eta must lie in \[0.0, inf\], got -0.01"),
    (dict(adaptive_mask={"w": 1}), TypeError, r"adaptive_mask's leaves must be Python bools .* got 1 at \['w'\]"),
  ],
)
@pytest.mark.parametrize("make", [aace_jax.aace_sam, aace_jax.sam])
def test_bad_arguments(make, kwargs, error, match):
  with pytest.raises(error, match=match):
    make(optax.sgd(0.1), **kwargs)


def test_optimizer_must_be_a_transformation():
  with pytest.raises(TypeError, match="optax.GradientTransformation, got 0.1"):
    aace_jax.aace_sam(0.1)


def test_schedule_free_around_aace_sam_takes_the_sharpness_aware_gradient_at_y():
  params, x, y = make_mlp_problem()
  params = jax.tree.map(jnp.asarray, params)
  mean_loss = lambda w, fn: fn(jax_mlp(w, x), y).mean()
  rho, lr = 0.2, 0.05
  wrapped = optax.contrib.schedule_free(aace_jax.aace_sam(optax.sgd(lr), rho), lr)
  plain = optax.contrib.schedule_free(optax.sgd(lr), lr)
  wrapped_state, plain_state = wrapped.init(params), plain.init(params)
  for _ in range(3):
    g = jax.grad(mean_loss)(params, aace_jax.aace_cross_entropy)
    updates, wrapped_state = wrapped.update(
      g, wrapped_state, params, grad_fn=jax.grad(lambda w: mean_loss(w, aace_jax.cross_entropy))
    )
    # By hand: perturb y (the parameters schedule-free evaluates), take the gradient there, feed plain SGD.
    g_adv = jax.grad(mean_loss)(jax.tree.map(lambda w, gi: w - rho * gi, params, g), aace_jax.cross_entropy)
    expected, plain_state = plain.update(g_adv, plain_state, params)
    for k in params:
      np.testing.assert_allclose(updates[k], expected[k], rtol=1e-5, atol=1e-7, err_msg=k)
    params = optax.apply_updates(params, updates)


def test_lookahead_around_aace_sam_is_refused_with_a_pointer():
  w = jnp.ones(3)
  grad_fn = jax.grad(lambda v: jnp.sum(v**2))
  tx = optax.with_extra_args_support(optax.lookahead(aace_jax.aace_sam(optax.sgd(0.1)), 2, 0.5))
  params = optax.LookaheadParams.init_synced(w)
  with pytest.raises(TypeError, match=r"optax.lookahead around aace_sam is not supported"):
    tx.update(optax.LookaheadParams(w, w), tx.init(params), params, grad_fn=grad_fn)
  with pytest.raises(TypeError, match="grad_fn"):  # optax's own refusal: lookahead passes no extra arguments
    optax.lookahead(aace_jax.aace_sam(optax.sgd(0.1)), 2, 0.5).update(
      optax.LookaheadParams(w, w), tx.init(params), params, grad_fn=grad_fn
    )
