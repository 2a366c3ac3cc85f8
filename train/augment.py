"""Augmentation and normalization on the device: pure, batched functions of (images, keys).

The host hands the trainer images as they are stored (uint8, or float32 in
[0, 1] for scikit-learn's digits); the jitted step turns them into the
normalized float32 batch the model sees, once per step, so both SAM passes
train on the same images. Every example's random choices come from its own
key, a function of (seed, epoch, position of the example in the epoch), so a
batch, and each device's share of it, is the same on any number of hosts and
devices, and a resumed run draws exactly what an uninterrupted one would.

The semantics are the authors' (T-Ratchatorn/AACE): random crop with zero
padding 4 and horizontal flip on the [0, 1] image, then per-channel
normalization, then Cutout: with probability 1/2 a 16x16 patch is zeroed,
its corner uniform in [-8, side - 8) so that patches overhanging the border
are clipped.
"""

from typing import NamedTuple
from typing import Sequence

import jax
import jax.numpy as jnp

AUGMENTATIONS = ("none", "cutout", "flip_cutout", "cifar")
CROP_PADDING = 4
CUTOUT_SIZE = 16
CUTOUT_PROBABILITY = 0.5
# Folded into the run's seed so that augmentation draws never coincide with
# the keys the train step derives from the same seed.
_AUGMENT_STREAM = 0xA06E


class Draws(NamedTuple):
  """The random choices of a batch, one entry per example.

  Attributes:
    crop_top, crop_left: int32 offsets of the crop in the padded image, in
      ``[0, 2 * CROP_PADDING]``.
    flip: bool, mirror the image left to right.
    cutout: bool, apply Cutout.
    cutout_top, cutout_left: int32 corner of the Cutout patch, in
      ``[-CUTOUT_SIZE // 2, side - CUTOUT_SIZE // 2)``; clipped at the border.
  """

  crop_top: jax.Array
  crop_left: jax.Array
  flip: jax.Array
  cutout: jax.Array
  cutout_top: jax.Array
  cutout_left: jax.Array


def example_keys(seed: int, epoch: jax.Array, positions: jax.Array) -> jax.Array:
  """One key per example: a function of the run's seed, the epoch and the example's position in it."""
  epoch_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _AUGMENT_STREAM), epoch)
  return jax.vmap(lambda position: jax.random.fold_in(epoch_key, position))(positions)


def sample_draws(keys: jax.Array, height: int, width: int) -> Draws:
  """Every example's crop offsets, flip bit and Cutout corner, from its key."""

  def one(key):
    keys = jax.random.split(key, 6)
    half = CUTOUT_SIZE // 2
    return Draws(
      crop_top=jax.random.randint(keys[0], (), 0, 2 * CROP_PADDING + 1),
      crop_left=jax.random.randint(keys[1], (), 0, 2 * CROP_PADDING + 1),
      flip=jax.random.bernoulli(keys[2]),
      cutout=jax.random.bernoulli(keys[3], CUTOUT_PROBABILITY),
      cutout_top=jax.random.randint(keys[4], (), -half, height - half),
      cutout_left=jax.random.randint(keys[5], (), -half, width - half),
    )

  return jax.vmap(one)(keys)


def to_unit_range(images: jax.Array) -> jax.Array:
  """float32 images in [0, 1]: uint8 is divided by 255, floats are taken as they are."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """Per-channel normalization of stored images (evaluation, and `augment="none"`)."""
  return (to_unit_range(images) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _crop(images, top, left):
  """Zero-pads every image by CROP_PADDING and takes the window at (top, left)."""
  _, height, width, _ = images.shape
  pad = CROP_PADDING
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  window = lambda image, row, column: jax.lax.dynamic_slice(image, (row, column, 0), (height, width, image.shape[-1]))
  return jax.vmap(window)(padded, top, left)


def _cutout_mask(draws: Draws, height: int, width: int) -> jax.Array:
  """True where Cutout zeroes a pixel; [batch, height, width]."""
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  top, left = draws.cutout_top[:, None], draws.cutout_left[:, None]
  in_rows = (rows >= top) & (rows < top + CUTOUT_SIZE)
  in_cols = (cols >= left) & (cols < left + CUTOUT_SIZE)
  return draws.cutout[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]


def augment(images: jax.Array, draws: Draws, *, kind: str, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """Augments and normalizes a batch of stored images with the given draws.

  Args:
    images: ``[batch, height, width, channels]``, uint8 or float in [0, 1].
    draws: from :func:`sample_draws`; fields a `kind` does not use are ignored.
    kind: ``"cifar"`` (crop, flip, Cutout), ``"flip_cutout"``, ``"cutout"`` or
      ``"none"`` (normalization only).
    mean, std: per-channel normalization of the [0, 1] image.

  Returns:
    float32 ``[batch, height, width, channels]``.
  """
  if kind not in AUGMENTATIONS:
    raise ValueError(f"augment: kind {kind!r} is not one of {AUGMENTATIONS}.")
  _, height, width, _ = images.shape
  x = to_unit_range(images)
  if kind == "cifar":
    x = _crop(x, draws.crop_top, draws.crop_left)
  if kind in ("cifar", "flip_cutout"):
    x = jnp.where(draws.flip[:, None, None, None], x[:, :, ::-1], x)
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  if kind in ("cifar", "flip_cutout", "cutout"):
    x = jnp.where(_cutout_mask(draws, height, width)[..., None], 0.0, x)
  return x


def augment_batch(
  images: jax.Array,
  *,
  seed: int,
  epoch: jax.Array,
  positions: jax.Array,
  kind: str,
  mean: Sequence[float],
  std: Sequence[float],
) -> jax.Array:
  """The training batch: draws from (seed, epoch, positions), then :func:`augment`."""
  if kind == "none":
    return normalize(images, mean, std)
  draws = sample_draws(example_keys(seed, epoch, positions), images.shape[1], images.shape[2])
  return augment(images, draws, kind=kind, mean=mean, std=std)
