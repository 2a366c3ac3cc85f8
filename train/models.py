"""Flax Linen models of the paper: WideResNet, PyramidNet, and small ones for quick runs.

Linen because the step is functional: ``params`` and ``batch_stats`` are plain
pytrees that the step differentiates, perturbs and replaces, with no
split/merge between the two passes. Every model takes NHWC images and
``train`` (batch statistics and dropout in training, running averages in
evaluation), and ends in global average pooling, so 28x28 inputs work too.
"""

import functools
from typing import Any
from typing import Callable
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# The authors' initialisation: Kaiming-normal (fan-in) convolutions for the
# WideResNet, normal(0, sqrt(2 / (k * k * out))) (fan-out) for PyramidNet,
# BatchNorm 1/0. Untruncated normals, as torch draws them.
wrn_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
pyramid_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and bias.
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


def _torch_linear_bias_init(fan_in: int):
  bound = 1.0 / jnp.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class WideResNetUnit(nn.Module):
  """Pre-activation unit: (BN-ReLU-conv3x3) x 2, 1x1 conv shortcut on a shape change."""

  channels: int
  strides: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=wrn_conv_init, dtype=self.dtype)
    norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    shape_changes = self.strides != 1 or x.shape[-1] != self.channels
    activated = nn.relu(norm()(x))
    if shape_changes:
      # The authors' DownsampleUnit: the shortcut sees the activated input.
      shortcut = conv(self.channels, (1, 1), self.strides, padding=0)(activated)
    else:
      shortcut = x
    y = conv(self.channels, (3, 3), self.strides, padding=1)(activated)
    y = nn.relu(norm()(y))
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = conv(self.channels, (3, 3), 1, padding=1)(y)
    return y + shortcut


class WideResNet(nn.Module):
  """Pre-activation WideResNet-depth-width (Zagoruyko & Komodakis, 2016).

  Stem conv with 16 channels, three groups of ``units_per_group`` units with
  16w, 32w, 64w channels (strides 1, 2, 2), then BN-ReLU, global average
  pooling and a zero-initialized linear layer, as in the authors' code.
  ``units_per_group`` defaults to the standard ``(depth - 4) // 6`` (WRN-28-10:
  36.5M parameters for 100 classes); the authors' code builds one more unit per
  group (``(depth - 4) // 6 + 1``, 46.2M parameters for "WRN-28-10").
  """

  depth: int
  width: int
  num_classes: int
  dropout: float = 0.0
  units_per_group: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet: depth must be 6n + 4, got {self.depth}.")
    units = self.units_per_group or (self.depth - 4) // 6
    x = nn.Conv(16, (3, 3), padding=1, use_bias=False, kernel_init=wrn_conv_init, dtype=self.dtype)(x)
    for group, strides in enumerate((1, 2, 2)):
      for unit in range(units):
        x = WideResNetUnit(16 * self.width * 2**group, strides if unit == 0 else 1, self.dropout, self.dtype)(
          x, train=train
        )
    x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype)(x)


class PyramidBlock(nn.Module):
  """PyramidNet residual block; the shortcut is average-pooled and zero-padded."""

  channels: int
  strides: int
  bottleneck: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=pyramid_conv_init, dtype=self.dtype)
    norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    y = norm()(x)
    if self.bottleneck:
      y = conv(self.channels, (1, 1))(y)
      y = nn.relu(norm()(y))
      y = conv(self.channels, (3, 3), self.strides, padding=1)(y)
      y = nn.relu(norm()(y))
      y = conv(self.channels * 4, (1, 1))(y)
    else:
      y = conv(self.channels, (3, 3), self.strides, padding=1)(y)
      y = nn.relu(norm()(y))
      y = conv(self.channels, (3, 3), padding=1)(y)
    y = norm()(y)
    shortcut = x
    if self.strides != 1:
      # torch's AvgPool2d(2, ceil_mode=True): odd sizes (7x7 on 28x28 inputs) keep their edge.
      shortcut = nn.avg_pool(shortcut, (2, 2), (2, 2), padding="SAME", count_include_pad=False)
    padding = y.shape[-1] - shortcut.shape[-1]
    shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, padding)))
    return y + shortcut


class PyramidNet(nn.Module):
  """PyramidNet (Han et al., 2017) for small images.

  The authors' model is the basic-block PyramidNet-272 with alpha 200 (no
  ShakeDrop); ``bottleneck=True`` gives the SAM paper's bottleneck variant.
  Channels grow by ``alpha / (3 n)`` per block from 16.
  """

  depth: int
  alpha: int
  num_classes: int
  bottleneck: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    per_block = 9 if self.bottleneck else 6
    if (self.depth - 2) % per_block:
      raise ValueError(f"PyramidNet: depth must be {per_block}n + 2, got {self.depth}.")
    blocks = (self.depth - 2) // per_block
    add_rate = self.alpha / (3 * blocks)
    x = nn.Conv(16, (3, 3), padding=1, use_bias=False, kernel_init=pyramid_conv_init, dtype=self.dtype)(x)
    x = BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
    channels = 16.0
    for stage in range(3):
      for block in range(blocks):
        channels += add_rate
        strides = 2 if stage > 0 and block == 0 else 1
        x = PyramidBlock(int(round(channels)), strides, self.bottleneck, self.dtype)(x, train=train)
    x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(
      self.num_classes,
      kernel_init=torch_linear_init,
      bias_init=_torch_linear_bias_init(x.shape[-1]),
      dtype=self.dtype,
    )(x)


class SmallCNN(nn.Module):
  """A small BatchNorm CNN for the 8x8 digits default: two conv stages and a linear head."""

  num_classes: int
  channels: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    for features, strides in ((self.channels, 1), (2 * self.channels, 2)):
      x = nn.Conv(features, (3, 3), strides, padding=1, use_bias=False, kernel_init=wrn_conv_init, dtype=self.dtype)(x)
      x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class MnistCNN(nn.Module):
  """A small CNN for 28x28 images: two conv-BN-ReLU-maxpool stages, then a dense hidden layer and the classifier.

  422k parameters at 10 classes, 400k of them in the hidden layer, which has
  no normalization (``head_norm=False``): enough capacity to memorize a few
  thousand Fashion-MNIST images. ``head_norm=True`` puts BatchNorm between
  the hidden layer and its ReLU, as the paper's networks normalize before
  their classifier.
  """

  num_classes: int
  channels: int = 32
  hidden: int = 128
  head_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    for features in (self.channels, 2 * self.channels):
      x = nn.Conv(features, (3, 3), padding=1, use_bias=False, kernel_init=wrn_conv_init, dtype=self.dtype)(x)
      x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype)(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.Dense(self.hidden, use_bias=not self.head_norm, dtype=self.dtype)(x.reshape(x.shape[0], -1))
    if self.head_norm:
      x = BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(nn.relu(x))


class Linear(nn.Module):
  """A linear classifier on the flattened image: the cheapest step, for timing what the host adds."""

  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    return nn.Dense(self.num_classes, dtype=self.dtype)(x.reshape(x.shape[0], -1))


MODELS = {
  "linear": functools.partial(Linear),
  "small_cnn": functools.partial(SmallCNN),
  "mnist_cnn": functools.partial(MnistCNN),
  "mnist_cnn_head_norm": functools.partial(MnistCNN, head_norm=True),
  # Half as wide (16 and 32 channels, 64 hidden units), BatchNorm after every hidden layer: 106k parameters,
  # the label-noise comparison's network (train/configs/label_noise.py).
  "mnist_cnn_narrow": functools.partial(MnistCNN, channels=16, hidden=64, head_norm=True),
  "wrn16_4": functools.partial(WideResNet, 16, 4),
  "wrn28_10": functools.partial(WideResNet, 28, 10),
  # The authors' "WRN-28-10": 5 units per group (46.2M parameters at 100 classes), the network behind
  # the paper's numbers; "wrn28_10" is the standard 4-unit one (36.5M).
  "wrn28_10_authors": functools.partial(WideResNet, 28, 10, units_per_group=5),
  "pyramidnet272": functools.partial(PyramidNet, 272, 200),
  "pyramidnet272_bottleneck": functools.partial(PyramidNet, 272, 200, bottleneck=True),
}


def init_variables(model: nn.Module, key: jax.Array, image_shape: tuple[int, ...]):
  """`model.init(key, ...)` for one image of `image_shape`, compiled as `run_init` compiles."""
  return run_init(lambda key: model.init(key, jnp.zeros((1, *image_shape)), train=False), key)


def run_init(init: Callable, *args):
  """`init(*args)` compiled at backend optimization level 0: for programs that run once, such as a model's init.

  XLA drops the forward pass from a compiled init (only the initializers
  reach the outputs), so what takes time is compiling the hundreds of random
  initializers themselves: 251 s for PyramidNet-272 on a 2-core CPU. Compiled
  at backend optimization level 0 they take a fifth of that, and init runs
  once. The values equal the jitted ``model.init``'s up to float32 rounding
  (a few ulps, as eager and jitted ``model.init`` already differ).
  """
  return jax.jit(init).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


# The computation dtypes a config may name; parameters stay float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create_model(name: str, num_classes: int, dtype=jnp.float32) -> nn.Module:
  """The model called `name` (a key of `MODELS`) for `num_classes` classes.

  ``dtype`` is the computation dtype; parameters stay float32.
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose one of {sorted(MODELS)}.")
  return MODELS[name](num_classes=num_classes, dtype=dtype)
