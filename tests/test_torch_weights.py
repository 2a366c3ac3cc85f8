"""The authors' PyTorch weights in our Flax models: names and shapes from their module structure, and
their forward pass, restated here in NCHW with their tensors, agrees with ours (no torch needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import models
from train import torch_weights

RNG = np.random.default_rng(0)


def conv(x, w, stride=1, padding=1):
  return jax.lax.conv_general_dilated(
    x, w, (stride, stride), [(padding, padding)] * 2, dimension_numbers=("NCHW", "OIHW", "NCHW")
  )


def batch_norm(sd, name, x):
  shape = (1, -1, 1, 1)
  scale = sd[f"{name}.weight"].reshape(shape) / np.sqrt(sd[f"{name}.running_var"].reshape(shape) + 1e-5)
  return (x - sd[f"{name}.running_mean"].reshape(shape)) * scale + sd[f"{name}.bias"].reshape(shape)


def add_batch_norm(sd, name, channels):
  sd[f"{name}.weight"] = RNG.uniform(0.5, 1.5, channels).astype(np.float32)
  sd[f"{name}.bias"] = RNG.normal(size=channels).astype(np.float32) * 0.1
  sd[f"{name}.running_mean"] = RNG.normal(size=channels).astype(np.float32) * 0.1
  sd[f"{name}.running_var"] = RNG.uniform(0.5, 1.5, channels).astype(np.float32)
  sd[f"{name}.num_batches_tracked"] = np.array(7)


def add_conv(sd, name, out, inp, k):
  sd[f"{name}.weight"] = (RNG.normal(size=(out, inp, k, k)) * np.sqrt(2 / (inp * k * k))).astype(np.float32)


def add_linear(sd, name, out, inp):
  sd[f"{name}.weight"] = RNG.normal(size=(out, inp)).astype(np.float32) * 0.1
  sd[f"{name}.bias"] = RNG.normal(size=out).astype(np.float32) * 0.1


def wrn_state_dict(depth, width, classes):
  """Names and shapes of their `WideResNet_cifar(depth, width, 0, 3, classes)`, random values."""
  filters, units = [16, 16 * width, 32 * width, 64 * width], (depth - 4) // 6
  sd = {}
  add_conv(sd, "f.0_convolution", 16, 3, 3)
  for group in range(3):
    c_in, c = filters[group], filters[group + 1]
    b = f"f.{group + 1}_block.block"
    add_batch_norm(sd, f"{b}.0.norm_act.0_normalization", c_in)
    add_conv(sd, f"{b}.0.block.0_convolution", c, c_in, 3)
    add_batch_norm(sd, f"{b}.0.block.1_normalization", c)
    add_conv(sd, f"{b}.0.block.4_convolution", c, c, 3)
    add_conv(sd, f"{b}.0.downsample", c, c_in, 1)
    for unit in range(1, units + 1):
      add_batch_norm(sd, f"{b}.{unit}.block.0_normalization", c)
      add_conv(sd, f"{b}.{unit}.block.2_convolution", c, c, 3)
      add_batch_norm(sd, f"{b}.{unit}.block.3_normalization", c)
      add_conv(sd, f"{b}.{unit}.block.6_convolution", c, c, 3)
  add_batch_norm(sd, "f.4_normalization", filters[3])
  add_linear(sd, "f.8_classification", classes, filters[3])
  return sd


def wrn_forward(sd, x, depth):
  """Their forward in evaluation mode: pre-activation units, AvgPool2d(8) on the 8x8 map, linear."""
  relu, units = jax.nn.relu, (depth - 4) // 6
  x = conv(x, sd["f.0_convolution.weight"])
  for group in range(3):
    b = f"f.{group + 1}_block.block"
    a = relu(batch_norm(sd, f"{b}.0.norm_act.0_normalization", x))
    y = conv(a, sd[f"{b}.0.block.0_convolution.weight"], stride=1 if group == 0 else 2)
    y = conv(relu(batch_norm(sd, f"{b}.0.block.1_normalization", y)), sd[f"{b}.0.block.4_convolution.weight"])
    x = y + conv(a, sd[f"{b}.0.downsample.weight"], stride=1 if group == 0 else 2, padding=0)
    for unit in range(1, units + 1):
      y = conv(
        relu(batch_norm(sd, f"{b}.{unit}.block.0_normalization", x)), sd[f"{b}.{unit}.block.2_convolution.weight"]
      )
      y = conv(
        relu(batch_norm(sd, f"{b}.{unit}.block.3_normalization", y)), sd[f"{b}.{unit}.block.6_convolution.weight"]
      )
      x = x + y
  x = relu(batch_norm(sd, "f.4_normalization", x)).mean(axis=(2, 3))
  return x @ sd["f.8_classification.weight"].T + sd["f.8_classification.bias"]


def pyramid_state_dict(depth, alpha, classes):
  """Names and shapes of their basic-block `PyramidNet('cifar100', depth, alpha, classes)`, random values."""
  n = (depth - 2) // 6
  add_rate, sd, dim, inp = alpha / (3 * n), {}, 16.0, 16
  add_conv(sd, "conv1", 16, 3, 3)
  add_batch_norm(sd, "bn1", 16)
  widths = []
  for stage in range(3):
    for i in range(n):
      dim += add_rate
      out = int(round(dim))
      p = f"layer{stage + 1}.{i}"
      add_batch_norm(sd, f"{p}.bn1", inp)
      add_conv(sd, f"{p}.conv1", out, inp, 3)
      add_batch_norm(sd, f"{p}.bn2", out)
      add_conv(sd, f"{p}.conv2", out, out, 3)
      add_batch_norm(sd, f"{p}.bn3", out)
      widths.append((stage, i))
      inp = out
  add_batch_norm(sd, "bn_final", inp)
  add_linear(sd, "fc", classes, inp)
  return sd, widths


def pyramid_forward(sd, x, widths):
  relu = jax.nn.relu
  x = batch_norm(sd, "bn1", conv(x, sd["conv1.weight"]))
  for stage, i in widths:
    p, stride = f"layer{stage + 1}.{i}", 2 if stage > 0 and i == 0 else 1
    y = conv(batch_norm(sd, f"{p}.bn1", x), sd[f"{p}.conv1.weight"], stride=stride)
    y = conv(relu(batch_norm(sd, f"{p}.bn2", y)), sd[f"{p}.conv2.weight"])
    y = batch_norm(sd, f"{p}.bn3", y)
    shortcut = x
    if stride == 2:  # AvgPool2d(2, 2, ceil_mode=True) on even maps
      shortcut = shortcut.reshape(*shortcut.shape[:2], shortcut.shape[2] // 2, 2, shortcut.shape[3] // 2, 2).mean(
        (3, 5)
      )
    pad = y.shape[1] - shortcut.shape[1]
    x = y + jnp.pad(shortcut, ((0, 0), (0, pad), (0, 0), (0, 0)))
  x = relu(batch_norm(sd, "bn_final", x)).mean(axis=(2, 3))
  return x @ sd["fc.weight"].T + sd["fc.bias"]


def ours(model, state_dict, architecture, blocks):
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  return torch_weights.from_authors(
    state_dict, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template), architecture=architecture, blocks=blocks
  )


def test_wrn_weights_give_the_authors_forward():
  depth, width, classes = 10, 2, 7  # their layout: 1 downsample + 1 basic unit per group
  sd = wrn_state_dict(depth, width, classes)
  model = models.WideResNet(depth, width, classes, units_per_group=(depth - 4) // 6 + 1)
  variables = ours(model, sd, "wrn", (depth - 4) // 6 + 1)
  images = RNG.normal(size=(4, 3, 32, 32)).astype(np.float32)
  expected = wrn_forward(sd, images, depth)
  got = model.apply(variables, images.transpose(0, 2, 3, 1), train=False)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_pyramidnet_weights_give_the_authors_forward():
  depth, alpha, classes = 14, 12, 5
  sd, widths = pyramid_state_dict(depth, alpha, classes)
  sd = {f"module.{k}": v for k, v in sd.items()}  # as saved from DataParallel
  model = models.PyramidNet(depth, alpha, classes)
  variables = ours(model, sd, "pyramidnet", (depth - 2) // 6)
  images = RNG.normal(size=(4, 3, 32, 32)).astype(np.float32)
  expected = pyramid_forward({k.removeprefix("module."): v for k, v in sd.items()}, images, widths)
  got = model.apply(variables, images.transpose(0, 2, 3, 1), train=False)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_wrong_shapes_and_names_are_named():
  sd = wrn_state_dict(10, 2, 7)
  model = models.WideResNet(10, 2, 10, units_per_group=2)  # 10 classes, the checkpoint has 7
  with pytest.raises(
    torch_weights.WeightsMismatch, match=r"'f.8_classification.weight' has shape \(128, 7\).*has \(128, 10\)"
  ):
    ours(model, sd, "wrn", 2)
  with pytest.raises(torch_weights.WeightsMismatch, match=r"'f.9_extra.weight' has no counterpart"):
    ours(models.WideResNet(10, 2, 7, units_per_group=2), {**sd, "f.9_extra.weight": np.zeros(3)}, "wrn", 2)
  missing = {k: v for k, v in sd.items() if not k.startswith("f.4_normalization")}
  with pytest.raises(
    torch_weights.WeightsMismatch, match="no tensor of the checkpoint fills our batch_stats/BatchNorm_0/mean"
  ):
    ours(models.WideResNet(10, 2, 7, units_per_group=2), missing, "wrn", 2)


def test_the_paper_networks_have_the_authors_parameter_counts():
  def count(model):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))

  assert count(models.create_model("wrn28_10_authors", 100)) == 46_218_164
  assert count(models.create_model("pyramidnet272", 100)) == 41_131_331
  # And the mapping covers those networks' own names: their state dict at full size maps without error.
  sd = wrn_state_dict(28, 10, 100)
  shapes = jax.eval_shape(
    lambda: models.create_model("wrn28_10_authors", 100).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )
  mapped = torch_weights.from_authors(
    sd, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), architecture="wrn", blocks=5
  )
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(mapped["params"])) == 46_218_164


def test_evaluate_maps_evaluates_and_checkpoints_the_authors_weights(tmp_path):
  import tensorflow_datasets as tfds

  from tests.helpers import latest_checkpoint
  from train import config_checks
  from train import evaluate_authors_checkpoint as evaluate
  from train.configs import paper

  config = paper.get_config("wrn28_10,cifar10,aace_sam")
  config.batch_size, config.eval_batch_size = 8, 8
  config.decoded_cache_dir = str(tmp_path / "decoded")
  sd = wrn_state_dict(28, 10, 10)
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    result = evaluate.load_authors_weights(config, sd, str(tmp_path / "run"))
  assert 0 <= result["val_acc"] <= 1 and np.isfinite(result["val_loss"])
  step, tree = latest_checkpoint(str(tmp_path / "run"))
  assert step == 0
  np.testing.assert_array_equal(tree["params"]["Dense_0"]["kernel"], sd["f.8_classification.weight"].T)
  np.testing.assert_array_equal(
    tree["params"]["WideResNetUnit_5"]["Conv_0"]["kernel"],
    sd["f.2_block.block.0.downsample.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    tree["model_state"]["batch_stats"]["BatchNorm_0"]["var"], sd["f.4_normalization.running_var"]
  )
  config_checks.check_resumable(config, str(tmp_path / "run"))  # the trainer accepts the workdir to fine-tune from
