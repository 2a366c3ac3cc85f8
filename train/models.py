"""Flax Linen models of the paper: WideResNet, PyramidNet, and small ones for quick runs.

Linen because the step is functional: ``params`` and ``batch_stats`` are plain
pytrees that the step differentiates, perturbs and replaces, with no
split/merge between the two passes. Every model takes NHWC images and
``train`` (batch statistics and dropout in training, running averages in
evaluation), and ends in global average pooling, so 28x28 inputs work too.
"""

import functools
from typing import Any
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

MOMENTUM, EPSILON = 0.9, 1e-5
BatchNorm = functools.partial(nn.BatchNorm, momentum=MOMENTUM, epsilon=EPSILON)


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


class _ConvKernel(nn.Module):
  """An `nn.Conv` kernel (no bias) declared alone: the same name, shape, dtype and random init."""

  shape: tuple[int, ...]

  @nn.compact
  def __call__(self):
    return self.param("kernel", pyramid_conv_init, self.shape, jnp.float32)


class _BatchNormVariables(nn.Module):
  """The variables `BatchNorm` declares (running mean and variance, scale, bias), declared alone."""

  features: int

  @nn.compact
  def __call__(self):
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((self.features,), jnp.float32))
    var = self.variable("batch_stats", "var", lambda: jnp.ones((self.features,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return mean, var, scale, bias


class _PyramidBlockVariables(nn.Module):
  """A basic `PyramidBlock`'s variables, declared under its name in its order, for the scanned forward."""

  in_channels: int
  channels: int

  @nn.compact
  def __call__(self):
    c_in, c = self.in_channels, self.channels
    return (
      _BatchNormVariables(c_in, name="BatchNorm_0")(),
      _ConvKernel((3, 3, c_in, c), name="Conv_0")(),
      _BatchNormVariables(c, name="BatchNorm_1")(),
      _ConvKernel((3, 3, c, c), name="Conv_1")(),
      _BatchNormVariables(c, name="BatchNorm_2")(),
    )


def _batch_norm(x, mean, var, scale, bias, *, train: bool, dtype):
  """`BatchNorm` (fast variance, statistics in at least float32) as a function.

  Returns the output and the batch's (mean, var) in training, else the running ones.
  """
  if train:
    stats = x.astype(jnp.promote_types(dtype, jnp.float32))
    mean = stats.mean((0, 1, 2))
    var = jnp.maximum(0.0, jnp.square(stats).mean((0, 1, 2)) - jnp.square(mean))
  y = (x - mean) * (jax.lax.rsqrt(var + EPSILON) * scale) + bias
  return y.astype(dtype), (mean, var)


def _conv3x3(x, kernel, dtype):
  """`nn.Conv(features, (3, 3), padding=1, use_bias=False)` as a function."""
  return jax.lax.conv_general_dilated(
    x.astype(dtype), kernel.astype(dtype), (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _pad_channels(x, width: int, value: float = 0.0):
  pads = [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])]
  return jnp.pad(x, pads, constant_values=value)


class PyramidNet(nn.Module):
  """PyramidNet (Han et al., 2017) for small images.

  The authors' model is the basic-block PyramidNet-272 with alpha 200 (no
  ShakeDrop); ``bottleneck=True`` gives the SAM paper's bottleneck variant.
  Channels grow by ``alpha / (3 n)`` per block from 16.

  ``scan_blocks=k`` (basic blocks only) computes the same network with the
  stride-1 blocks of each stage in runs of k, each run one `jax.lax.scan`
  over its blocks padded to the run's widest: zero kernels and zero
  BatchNorm scale and bias on the padded channels keep them at zero, so every
  real channel computes what the unrolled blocks compute (up to the order of
  float additions), and XLA compiles one block per run instead of one per
  block (PyramidNet-272: 135 blocks). The variables keep the unrolled
  network's names, shapes and initial values.
  """

  depth: int
  alpha: int
  num_classes: int
  bottleneck: bool = False
  scan_blocks: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    per_block = 9 if self.bottleneck else 6
    if (self.depth - 2) % per_block:
      raise ValueError(f"PyramidNet: depth must be {per_block}n + 2, got {self.depth}.")
    if self.scan_blocks and self.bottleneck:
      raise ValueError("PyramidNet: scan_blocks is for basic blocks; set it to 0 with bottleneck=True.")
    blocks = (self.depth - 2) // per_block
    add_rate = self.alpha / (3 * blocks)
    widths, channels = [], 16.0
    for _ in range(3 * blocks):
      channels += add_rate
      widths.append(int(round(channels)))
    x = nn.Conv(16, (3, 3), padding=1, use_bias=False, kernel_init=pyramid_conv_init, dtype=self.dtype)(x)
    x = BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
    for stage in range(3):
      first = stage * blocks
      if not self.scan_blocks:
        for k in range(first, first + blocks):
          strides = 2 if stage > 0 and k == first else 1
          x = PyramidBlock(widths[k], strides, self.bottleneck, self.dtype, name=f"PyramidBlock_{k}")(x, train=train)
        continue
      x = PyramidBlock(widths[first], 2 if stage else 1, False, self.dtype, name=f"PyramidBlock_{first}")(
        x, train=train
      )
      for start in range(first + 1, first + blocks, self.scan_blocks):
        x = self._scanned_run(x, widths, range(start, min(start + self.scan_blocks, first + blocks)), train)
    x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(
      self.num_classes,
      kernel_init=torch_linear_init,
      bias_init=_torch_linear_bias_init(x.shape[-1]),
      dtype=self.dtype,
    )(x)

  def _scanned_run(self, x, widths: list[int], run: range, train: bool):
    """Stride-1 blocks `run` as one scan, on activations padded to the run's widest block."""
    width = widths[run[-1]]
    declared = [_PyramidBlockVariables(widths[k - 1], widths[k], name=f"PyramidBlock_{k}")() for k in run]

    def padded(variables):
      norms, kernels = variables[0::2], variables[1::2]
      return {
        "norms": [
          (
            _pad_channels(mean.value, width),
            _pad_channels(var.value, width, 1.0),
            _pad_channels(scale, width),
            _pad_channels(bias, width),
          )
          for mean, var, scale, bias in norms
        ],
        "kernels": [jnp.pad(k, ((0, 0), (0, 0), (0, width - k.shape[2]), (0, width - k.shape[3]))) for k in kernels],
      }

    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[padded(v) for v in declared])

    def block(x, p):
      norms, kernels = p["norms"], p["kernels"]
      y, stats_0 = _batch_norm(x, *norms[0], train=train, dtype=self.dtype)
      y, stats_1 = _batch_norm(_conv3x3(y, kernels[0], self.dtype), *norms[1], train=train, dtype=self.dtype)
      y, stats_2 = _batch_norm(_conv3x3(nn.relu(y), kernels[1], self.dtype), *norms[2], train=train, dtype=self.dtype)
      return y + x, (stats_0, stats_1, stats_2)

    x, stats = jax.lax.scan(block, _pad_channels(x, width), stacked)
    if train and not self.is_initializing():
      for index, variables in enumerate(declared):
        for (mean, var, _, _), (batch_mean, batch_var) in zip(variables[0::2], stats):
          features = mean.value.shape[0]
          mean.value = MOMENTUM * mean.value + (1 - MOMENTUM) * batch_mean[index, :features]
          var.value = MOMENTUM * var.value + (1 - MOMENTUM) * batch_var[index, :features]
    return x


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
  "wrn16_4": functools.partial(WideResNet, 16, 4),
  "wrn28_10": functools.partial(WideResNet, 28, 10),
  # The authors' "WRN-28-10": 5 units per group (46.2M parameters at 100 classes), the network behind
  # the paper's numbers; "wrn28_10" is the standard 4-unit one (36.5M).
  "wrn28_10_authors": functools.partial(WideResNet, 28, 10, units_per_group=5),
  "pyramidnet272": functools.partial(PyramidNet, 272, 200),
  "pyramidnet272_bottleneck": functools.partial(PyramidNet, 272, 200, bottleneck=True),
}


def init_variables(model: nn.Module, key: jax.Array, image_shape: tuple[int, ...]) -> dict:
  """`model.init(key, ...)`'s variables for one image of `image_shape`, compiled for a fast start.

  XLA drops the forward pass from the compiled init (only the initializers
  reach the outputs), so what takes time is compiling the hundreds of random
  initializers themselves: 251 s for PyramidNet-272 on a 2-core CPU. Compiled
  at backend optimization level 0 they take a fifth of that, and init runs
  once. The values equal the jitted ``model.init``'s up to float32 rounding
  (a few ulps, as eager and jitted ``model.init`` already differ).
  """
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, *image_shape)), train=False))
  return init.lower(key).compile(compiler_options={"xla_backend_optimization_level": 0})(key)


# The models whose stride-1 blocks can run as scans (`PyramidNet.scan_blocks`): the basic-block PyramidNets.
SCANNABLE_MODELS = tuple(
  name for name, make in MODELS.items() if make.func is PyramidNet and not make.keywords.get("bottleneck", False)
)

# The computation dtypes a config may name; parameters stay float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create_model(name: str, num_classes: int, dtype=jnp.float32, *, scan_blocks: int = 0) -> nn.Module:
  """The model called `name` (a key of `MODELS`) for `num_classes` classes.

  ``dtype`` is the computation dtype; parameters stay float32. ``scan_blocks``
  (basic-block PyramidNets only) is `PyramidNet.scan_blocks`.
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose one of {sorted(MODELS)}.")
  if scan_blocks and name not in SCANNABLE_MODELS:
    raise ValueError(f"scan_blocks={scan_blocks} applies to {SCANNABLE_MODELS}, not to {name!r}.")
  model = MODELS[name](num_classes=num_classes, dtype=dtype)
  return model.clone(scan_blocks=scan_blocks) if scan_blocks else model
