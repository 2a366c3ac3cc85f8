"""The losses against hand-derived values and a NumPy statement of the authors' code."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import aace_jax
from tests.helpers import np_softmax


def authors_targets(z, y, th=0.0, mode="ada", uniform=None):
  """The authors' `AdaptiveAdversrialCrossEntropy` target, restated in NumPy (float64)."""
  p = np_softmax(z)
  onehot = np.eye(z.shape[-1])[y]
  pp = (p * onehot).sum(-1, keepdims=True)
  pp_adv = pp - np.maximum(pp - th, 0)
  if mode == "ada":
    ad = p * (1 - onehot)
  elif mode == "const":
    ad = 1 - onehot
  else:
    ad = uniform * (1 - onehot)
  return pp_adv * onehot + ad / ad.sum(-1, keepdims=True)


def soft_ce(z, q):
  logp = z - z.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  return -(q * logp).sum(-1)


RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(6, 5)) * 3
LABELS = np.array([0, 1, 2, 3, 4, 2])


def test_ada_two_classes_hand_value():
  # Two classes: q is the other class's one-hot, so L = -log(1 - p_y) exactly.
  p_y = 0.9
  logits = jnp.log(jnp.array([[p_y, 1 - p_y]]))
  loss = aace_jax.aace_cross_entropy(logits, jnp.array([0]))
  np.testing.assert_allclose(loss, [-np.log(1 - p_y)], rtol=1e-6)


def test_ada_three_classes_hand_value():
  # p = (0.5, 0.3, 0.2), y = 0: q = (0, 0.6, 0.4).
  # L = -(0.6 log 0.3 + 0.4 log 0.2) = H(q) - log(1 - p_y).
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
  q = aace_jax.aace_targets(logits, jnp.array([0]))
  np.testing.assert_allclose(q, [[0.0, 0.6, 0.4]], atol=1e-7)
  loss = aace_jax.aace_cross_entropy(logits, jnp.array([0]))
  expected = -(0.6 * np.log(0.3) + 0.4 * np.log(0.2))
  np.testing.assert_allclose(loss, [expected], rtol=1e-6)
  # The authors' logged value, KL(q || p) = L - H(q), is -log(1 - p_y) = -log 0.5 here.
  kl = aace_jax.aace_kl_divergence(logits, jnp.array([0]))
  np.testing.assert_allclose(kl, [-np.log(0.5)], rtol=1e-6)


def test_const_mode_hand_value():
  # const: q = 1/(C-1) on every other class; L = -mean_{j != y} log p_j.
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
  loss = aace_jax.aace_cross_entropy(logits, jnp.array([1]), mode="const")
  np.testing.assert_allclose(loss, [-(np.log(0.5) + np.log(0.2)) / 2], rtol=1e-6)
  q = aace_jax.aace_targets(logits, jnp.array([1]), mode="const")
  np.testing.assert_allclose(q, [[0.5, 0.0, 0.5]])


def test_rand_mode():
  key = jax.random.key(3)
  with jax.enable_x64(True):
    q = np.asarray(aace_jax.aace_targets(LOGITS, LABELS, mode="rand", key=key))
    uniform = 1 - np.asarray(jax.random.uniform(key, LOGITS.shape, jnp.float64))
  np.testing.assert_allclose(q, authors_targets(LOGITS, LABELS, 0.0, "rand", uniform), rtol=1e-12)
  onehot = np.eye(5)[LABELS]
  assert np.all(q[onehot == 1] == 0) and np.all(q[onehot == 0] > 0)
  other_key = aace_jax.aace_targets(LOGITS, LABELS, mode="rand", key=jax.random.key(4))
  assert not np.allclose(q, other_key)


def test_rand_needs_key():
  with pytest.raises(ValueError, match="needs key"):
    aace_jax.aace_cross_entropy(LOGITS, LABELS, mode="rand")


@pytest.mark.parametrize("threshold", [0.0, 0.3])
@pytest.mark.parametrize("mode", ["ada", "const", "rand"])
def test_logit_gradient_is_p_minus_q(mode, threshold):
  key = jax.random.key(0)
  with jax.enable_x64(True):
    grad = np.asarray(
      jax.grad(lambda z: aace_jax.aace_cross_entropy(z, LABELS, threshold=threshold, mode=mode, key=key).sum())(
        jnp.asarray(LOGITS)
      )
    )
    q = np.asarray(aace_jax.aace_targets(LOGITS, LABELS, threshold=threshold, mode=mode, key=key))
  p = np_softmax(LOGITS)
  # d/dz of -sum q log np_softmax(z) is (sum q) p - q; (sum q) is 1 when threshold is 0.
  np.testing.assert_allclose(grad, q.sum(-1, keepdims=True) * p - q, rtol=1e-10, atol=1e-14)


def test_targets_have_no_gradient():
  grad = jax.grad(lambda z: aace_jax.aace_targets(z, LABELS).sum())(jnp.asarray(LOGITS, jnp.float32))
  assert np.all(np.asarray(grad) == 0)


def test_gradient_grows_with_confidence_while_ce_shrinks():
  # Four classes, the true class at logit t: p_y rises with t.
  sweep = np.linspace(-2.0, 8.0, 21)
  logits = jnp.array([[t, 0.3, -0.2, 0.1] for t in sweep])
  labels = jnp.zeros(len(sweep), jnp.int32)
  aace_grad = jax.vmap(jax.grad(lambda z, y: aace_jax.aace_cross_entropy(z, y)))(logits, labels)
  ce_grad = jax.vmap(jax.grad(lambda z, y: aace_jax.cross_entropy(z, y)))(logits, labels)
  aace_norm = np.linalg.norm(aace_grad, axis=-1)
  ce_norm = np.linalg.norm(ce_grad, axis=-1)
  assert np.all(np.diff(aace_norm) > 0)
  assert np.all(np.diff(ce_norm) < 0)
  # The paper's bound: p_y <= ||p - q|| <= sqrt(2) p_y.
  p_y = np_softmax(np.asarray(logits))[:, 0]
  assert np.all(aace_norm >= p_y * (1 - 1e-6)) and np.all(aace_norm <= np.sqrt(2) * p_y * (1 + 1e-6))


def test_cross_entropy_hand_values_and_smoothing():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
  np.testing.assert_allclose(aace_jax.cross_entropy(logits, jnp.array([1])), [-np.log(0.3)], rtol=1e-6)
  # Authors' smoothing: 1 - s on the true class, s / (C - 1) elsewhere.
  smoothed = aace_jax.cross_entropy(logits, jnp.array([1]), label_smoothing=0.2)
  expected = -(0.8 * np.log(0.3) + 0.1 * np.log(0.5) + 0.1 * np.log(0.2))
  np.testing.assert_allclose(smoothed, [expected], rtol=1e-6)


def test_losses_are_per_example():
  logits = jnp.zeros((2, 3, 4))
  labels = jnp.zeros((2, 3), jnp.int32)
  assert aace_jax.aace_cross_entropy(logits, labels).shape == (2, 3)
  assert aace_jax.cross_entropy(logits, labels).shape == (2, 3)
  np.testing.assert_allclose(aace_jax.cross_entropy(logits, labels), np.log(4), rtol=1e-6)


EXTREME_LOGITS = [([[80.0, 0.0, 0.0]], 0), ([[-80.0, 80.0, 0.0]], 0), ([[-80.0, 80.0, 0.0]], 1)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("logits, label", EXTREME_LOGITS)
def test_extreme_logits_are_finite(dtype, logits, label):
  z = jnp.asarray(logits, dtype)
  y = jnp.array([label])
  for fn in (aace_jax.aace_cross_entropy, aace_jax.cross_entropy):
    loss, grad = jax.value_and_grad(lambda z, fn=fn: fn(z, y).sum())(z)
    assert loss.dtype == dtype and grad.dtype == dtype
    assert np.all(np.isfinite(np.asarray(loss, np.float32)))
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
  # [80, 0, 0] with y = 0: q = (0, 1/2, 1/2), L = H(q) - log(1 - p_y) = log 2 + (80 - log 2).
  if logits == [[80.0, 0.0, 0.0]]:
    loss = aace_jax.aace_cross_entropy(z, y)
    np.testing.assert_allclose(np.asarray(loss, np.float32), [80.0], rtol=2e-2)


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(mode="adaptive"), ValueError, "mode must be one of .* got 'adaptive'"),
    (dict(threshold=1.5), ValueError, r"threshold must lie in \[0.0, 1.0\], got 1.5"),
    (dict(threshold=-0.1), ValueError, "got -0.1"),
  ],
)
def test_bad_hyperparameters(kwargs, error, match):
  with pytest.raises(error, match=match):
    aace_jax.aace_cross_entropy(LOGITS, LABELS, **kwargs)


@pytest.mark.parametrize(
  "logits, labels, error, match",
  [
    (np.zeros((4, 1)), np.zeros(4, int), ValueError, r"at least 2 classes, got shape \(4, 1\)"),
    (np.zeros((4, 3), int), np.zeros(4, int), TypeError, "floating point, got dtype int"),
    (np.zeros((4, 3)), np.zeros((4, 1), int), ValueError, r"labels of shape \(4, 1\)"),
    (np.zeros((4, 3)), np.zeros(5, int), ValueError, r"expected labels of shape \(4,\)"),
    (np.zeros((4, 3)), np.zeros(4), TypeError, "integer class indices, got dtype float"),
  ],
)
@pytest.mark.parametrize("fn", [aace_jax.aace_cross_entropy, aace_jax.cross_entropy, aace_jax.aace_targets])
def test_bad_inputs_raise_before_compiling(fn, logits, labels, error, match):
  with pytest.raises(error, match=match):
    jax.jit(fn)(logits, labels)


def test_bad_label_smoothing():
  with pytest.raises(ValueError, match="label_smoothing must lie in"):
    aace_jax.cross_entropy(LOGITS, LABELS, label_smoothing=2.0)


def test_out_of_range_labels_are_nan_under_jit():
  logits = jnp.zeros((3, 4))
  labels = jnp.array([0, 4, -1])
  for fn in (aace_jax.aace_cross_entropy, aace_jax.cross_entropy):
    loss, grad = jax.value_and_grad(lambda z, fn=fn: jax.jit(fn)(z, labels).sum())(logits)
    assert np.isnan(loss)
    per_example = jax.jit(fn)(logits, labels)
    assert np.isfinite(per_example[0]) and np.all(np.isnan(per_example[1:]))
    assert np.all(np.isnan(grad[1:]))


def test_check_labels():
  aace_jax.check_labels(np.array([[0, 1], [2, 1]]), 3)
  with pytest.raises(ValueError, match=r"labels\[2\] = -1 is outside \[0, 3\) \(2 of 4"):
    aace_jax.check_labels(np.array([0, 1, -1, 7]), 3)
  with pytest.raises(ValueError, match=r"labels\[\(1, 0\)\] = 3"):
    aace_jax.check_labels(np.array([[0, 1], [3, 1]]), 3)
  with pytest.raises(TypeError, match="integers"):
    aace_jax.check_labels(np.array([0.0, 1.0]), 3)
  with pytest.raises(ValueError, match="at least 2"):
    aace_jax.check_labels(np.array([0]), 1)


def authors_kl(z, q):
  """torch's F.kl_div(log_softmax(z), q, reduction='none').sum(-1), as the authors log it: xlogy(q, q) - q log p."""
  logp = z - z.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  with np.errstate(divide="ignore", invalid="ignore"):
    q_log_q = np.where(q > 0, q * np.log(q), 0.0)
  return (q_log_q - q * logp).sum(-1)


class AuthorsValuesTest(chex.TestCase):
  """Targets, loss, logged KL and gradients against the authors' code in NumPy, jitted and not (float64)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(mode=("ada", "const"), threshold=(0.0, 0.1, 0.5, 1.0))
  def test_targets_loss_and_logged_kl_match_the_authors(self, mode, threshold):
    settings = dict(threshold=threshold, mode=mode)

    def values(z, y):
      kl_grad = jax.grad(lambda z: aace_jax.aace_kl_divergence(z, y, **settings).sum())(z)
      ce_grad = jax.grad(lambda z: aace_jax.aace_cross_entropy(z, y, **settings).sum())(z)
      return (
        aace_jax.aace_targets(z, y, **settings),
        aace_jax.aace_cross_entropy(z, y, **settings),
        aace_jax.aace_kl_divergence(z, y, **settings),
        kl_grad,
        ce_grad,
      )

    with jax.enable_x64(True):
      q, ce, kl, kl_grad, ce_grad = jax.tree.map(np.asarray, self.variant(values)(LOGITS, LABELS))
    expected_q = authors_targets(LOGITS, LABELS, threshold, mode)
    np.testing.assert_allclose(q, expected_q, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ce, soft_ce(LOGITS, expected_q), rtol=1e-12)
    # The other classes are normalized on their own: the target sums to 1 + q_y.
    p_y = np_softmax(LOGITS)[np.arange(6), LABELS]
    np.testing.assert_allclose(np.sum(q, -1), 1 + np.minimum(p_y, threshold), rtol=1e-12)
    np.testing.assert_allclose(kl, authors_kl(LOGITS, expected_q), rtol=1e-12, atol=1e-14)
    assert np.all(ce - kl > 0)  # the entropy of q: what CE(q, p) adds to the logged value
    np.testing.assert_allclose(kl_grad, ce_grad, rtol=1e-12, atol=1e-15)  # the same perturbation


def test_kl_divergence_is_minus_log_one_minus_p_y_and_finite_when_confident():
  p_y = np_softmax(LOGITS)[np.arange(6), LABELS]
  with jax.enable_x64(True):
    np.testing.assert_allclose(aace_jax.aace_kl_divergence(LOGITS, LABELS), -np.log1p(-p_y), rtol=1e-12)
  confident = jnp.array([[30.0, 0.0, -2.0, 1.0]], jnp.bfloat16)  # 1 - p_y underflows to 0 in float32
  value = float(aace_jax.aace_kl_divergence(confident, jnp.array([0]))[0])
  z = np.array([30.0, 0.0, -2.0, 1.0])
  # -log(1 - p_y) = logsumexp(z) - logsumexp(z_others), and logsumexp(z) = 30 to float precision here.
  expected = 30.0 - np.log(np.exp(z[1:]).sum())
  assert np.isfinite(value) and abs(value - expected) < 0.1


def test_aace_loss_finite_where_the_authors_float16_formula_is_nan():
  logits = np.array([[30.0, 0.0, -2.0, 1.0]], np.float16)  # a confident prediction
  labels = np.array([0])
  # The authors' target in float16: p * (1 - onehot) / sum(...), and the sum underflows to 0.
  z = logits.astype(np.float16)
  p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  others = p * (1 - np.eye(4, dtype=np.float16)[labels])
  with np.errstate(invalid="ignore", divide="ignore"):
    authors_q = others / others.sum(-1, keepdims=True)
  assert np.isnan(authors_q).any()
  for dtype in (jnp.float16, jnp.bfloat16):
    loss, grad = jax.value_and_grad(lambda z: aace_jax.aace_cross_entropy(z, labels).sum())(jnp.asarray(logits, dtype))
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad, np.float32)))
    # q = softmax over the other classes: finite and summing to one.
    q = aace_jax.aace_targets(jnp.asarray(logits, dtype), labels)
    np.testing.assert_allclose(np.asarray(q).sum(), 1.0, rtol=1e-5)
