"""The paper's models: parameter counts from the architecture by hand, shapes, initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import models


def param_shapes(model, image_shape):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, *image_shape)), train=False))
  return variables["params"]


def count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def wrn_count_by_hand(depth, width, classes, units):
  del depth
  total = 3 * 16 * 9  # stem
  c_in = 16
  for c in (16 * width, 32 * width, 64 * width):
    total += 2 * c_in + 9 * c_in * c + 2 * c + 9 * c * c + c_in * c  # unit with 1x1 shortcut
    total += (units - 1) * (2 * c + 9 * c * c + 2 * c + 9 * c * c)
    c_in = c
  return total + 2 * c_in + c_in * classes + classes


def test_wrn28_10_parameter_count():
  n = count(param_shapes(models.WideResNet(28, 10, 100), (32, 32, 3)))
  assert n == wrn_count_by_hand(28, 10, 100, units=4) == 36_536_884  # "36.5M"
  authors = count(param_shapes(models.WideResNet(28, 10, 100, units_per_group=5), (32, 32, 3)))
  assert authors == wrn_count_by_hand(28, 10, 100, units=5)


def test_pyramidnet272_bottleneck_parameter_count():
  # Han et al. report 26.0M for PyramidNet-272 (alpha 200, bottleneck) on CIFAR-100.
  n = count(param_shapes(models.PyramidNet(272, 200, 100, bottleneck=True), (32, 32, 3)))
  assert 25.5e6 < n < 26.5e6


@pytest.mark.parametrize(
  "model",
  [
    models.WideResNet(10, 2, 7),
    models.PyramidNet(20, 24, 7),
    models.PyramidNet(29, 24, 7, bottleneck=True),
    models.SmallCNN(7),
  ],
  ids=["wrn", "pyramidnet", "pyramidnet_bottleneck", "small_cnn"],
)
@pytest.mark.parametrize("image_shape", [(32, 32, 3), (28, 28, 1)])
def test_any_image_size_gives_logits(model, image_shape):
  images = jax.random.normal(jax.random.key(0), (3, *image_shape))
  # Any finite parameters show the shapes flow; compiling the random init is slow on CPU.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(1), images, train=False))
  variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.05, s.dtype), shapes)
  logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, images)
  assert logits.shape == (3, 7)
  assert np.all(np.isfinite(logits))
  assert "batch_stats" in updates


def test_wrn_initialisation_is_the_authors():
  params = models.WideResNet(16, 4, 10).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
  head = params["Dense_0"]
  assert np.all(head["kernel"] == 0) and np.all(head["bias"] == 0)
  kernel = np.asarray(params["WideResNetUnit_5"]["Conv_1"]["kernel"])  # 3x3x256x256
  fan_in = 9 * kernel.shape[2]
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / fan_in), rtol=0.02)
  assert np.abs(kernel).max() > 4 * np.sqrt(2.0 / fan_in)  # untruncated normal
  assert np.all(params["BatchNorm_0"]["scale"] == 1) and np.all(params["BatchNorm_0"]["bias"] == 0)


def test_pyramidnet_channels_grow_by_alpha():
  params = param_shapes(models.PyramidNet(20, 48, 10), (32, 32, 3))
  # n = 3 blocks per stage, 9 blocks: widths round(16 + 48 * k / 9), ending at 64.
  widths = [params[f"PyramidBlock_{k}"]["Conv_1"]["kernel"].shape[-1] for k in range(9)]
  assert widths == [int(round(16 + 48 * (k + 1) / 9)) for k in range(9)]
  assert params["Dense_0"]["kernel"].shape == (64, 10)


def test_create_model_rejects_unknown_names():
  with pytest.raises(ValueError, match="Unknown model 'resnet50'"):
    models.create_model("resnet50", 10)


# Every architecture of the registry; PyramidNet at a small depth, since the jitted
# reference init of PyramidNet-272 alone compiles for minutes (it is the same class).
INIT_MODELS = {
  "linear": models.Linear(10),
  "small_cnn": models.SmallCNN(10),
  "mnist_cnn": models.MnistCNN(10),
  "mnist_cnn_head_norm": models.MnistCNN(10, head_norm=True),
  "wrn16_4": models.WideResNet(16, 4, 10),
  "wrn28_10": models.WideResNet(28, 10, 100),
  "pyramidnet20": models.PyramidNet(20, 48, 10),
  "pyramidnet29_bottleneck": models.PyramidNet(29, 48, 10, bottleneck=True),
}


@pytest.mark.parametrize("name", sorted(INIT_MODELS))
def test_fast_init_gives_model_init_parameters(name):
  model = INIT_MODELS[name]
  key = jax.random.key(7)
  expected = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(key)
  got = models.init_variables(model, key, (32, 32, 3))
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert a.shape == b.shape and a.dtype == b.dtype
    # Equal up to float32 rounding of the initializers (eager and jitted model.init differ likewise).
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)


def test_registry_models_are_covered_by_the_init_test():
  covered = {type(m) for m in INIT_MODELS.values()}
  assert {type(models.create_model(name, 10)) for name in models.MODELS} <= covered


@pytest.mark.parametrize(
  "name, expected",
  [
    # conv 3*3*1*32 + BN 2*32 + conv 3*3*32*64 + BN 2*64 + dense 7*7*64*128 (+ 128 bias | + BN 2*128) + 128*10 + 10
    ("mnist_cnn", 288 + 64 + 18432 + 128 + 401408 + 128 + 1290),
    ("mnist_cnn_head_norm", 288 + 64 + 18432 + 128 + 401408 + 256 + 1290),
  ],
)
def test_mnist_cnns_have_the_documented_layers(name, expected):
  variables = models.init_variables(models.create_model(name, 10), jax.random.key(0), (28, 28, 1))
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) == expected
  assert ("BatchNorm_2" in variables["batch_stats"]) == (name == "mnist_cnn_head_norm")
