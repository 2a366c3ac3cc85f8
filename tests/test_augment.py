"""Device augmentation against a NumPy reference fed the same draws; determinism of the draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import augment

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def reference(image_uint8, draw, kind):
  """One example, the authors' order, written independently in NumPy (float64)."""
  x = image_uint8.astype(np.float64) / 255.0
  height, width = x.shape[:2]
  if kind == "cifar":
    padded = np.pad(x, ((4, 4), (4, 4), (0, 0)))
    x = padded[draw["crop_top"] : draw["crop_top"] + height, draw["crop_left"] : draw["crop_left"] + width]
  if kind in ("cifar", "flip_cutout") and draw["flip"]:
    x = x[:, ::-1]
  x = (x - np.array(MEAN)) / np.array(STD)
  if kind in ("cifar", "flip_cutout", "cutout") and draw["cutout"]:
    top, left = draw["cutout_top"], draw["cutout_left"]
    x = x.copy()
    x[max(top, 0) : max(min(top + 16, height), 0), max(left, 0) : max(min(left + 16, width), 0)] = 0.0
  return x


def scripted_draws(rows):
  fields = augment.Draws._fields
  return augment.Draws(*(jnp.asarray([row[f] for row in rows]) for f in fields)), rows


# Crop offsets at both ends, flips on and off, Cutout patches inside, overhanging every border, and off.
DRAWS = [
  dict(crop_top=0, crop_left=0, flip=False, cutout=True, cutout_top=5, cutout_left=10),
  dict(crop_top=8, crop_left=8, flip=True, cutout=True, cutout_top=-8, cutout_left=-8),
  dict(crop_top=4, crop_left=0, flip=True, cutout=True, cutout_top=23, cutout_left=-1),
  dict(crop_top=0, crop_left=8, flip=False, cutout=True, cutout_top=-3, cutout_left=23),
  dict(crop_top=3, crop_left=6, flip=True, cutout=False, cutout_top=7, cutout_left=7),
  dict(crop_top=7, crop_left=1, flip=False, cutout=True, cutout_top=16, cutout_left=16),
]


@pytest.mark.parametrize("kind", ["cifar", "flip_cutout", "cutout", "none"])
def test_augmentation_matches_numpy_reference_with_the_same_draws(kind):
  images = np.random.default_rng(0).integers(0, 256, (len(DRAWS), 32, 32, 3), dtype=np.uint8)
  draws, rows = scripted_draws(DRAWS)
  out = np.asarray(jax.jit(lambda x, d: augment.augment(x, d, kind=kind, mean=MEAN, std=STD))(images, draws))
  assert out.dtype == np.float32 and out.shape == images.shape
  for i, row in enumerate(rows):
    np.testing.assert_allclose(out[i], reference(images[i], row, kind), rtol=1e-5, atol=1e-5, err_msg=str(row))


def test_cutout_patch_sizes_at_the_border():
  images = np.full((len(DRAWS), 32, 32, 3), 255, np.uint8)
  draws, _ = scripted_draws(DRAWS)
  out = np.asarray(augment.augment(images, draws, kind="cutout", mean=(0.0,) * 3, std=(1.0,) * 3))
  zeroed = (out == 0).all(-1).sum(axis=(1, 2))
  # 16x16 inside; 8x8 at the top-left corner; 9 rows x 15 cols at the bottom; 13 x 9 at the right; none; 16x16.
  assert zeroed.tolist() == [256, 64, 9 * 15, 13 * 9, 0, 256]


def test_none_is_normalization_alone():
  images = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  out = augment.augment_batch(images, seed=0, epoch=3, positions=jnp.arange(4), kind="none", mean=MEAN, std=STD)
  expected = (images / 255.0 - np.array(MEAN)) / np.array(STD)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
  floats = images.astype(np.float32) / 255.0  # float sources (digits) are taken as [0, 1] already
  np.testing.assert_allclose(np.asarray(augment.normalize(floats, MEAN, STD)), expected, rtol=1e-5, atol=1e-5)


def sample(seed, epoch, positions, height=32, width=32):
  return jax.tree.map(
    np.asarray, augment.sample_draws(augment.example_keys(seed, epoch, jnp.asarray(positions)), height, width)
  )


def test_draws_are_a_function_of_seed_epoch_and_position():
  a = sample(0, 1, np.arange(512))
  again = sample(0, 1, np.arange(512))
  for x, y in zip(a, again):
    np.testing.assert_array_equal(x, y)
  # Position p's draws do not depend on which other examples share its batch.
  part = sample(0, 1, np.arange(100, 140))
  for x, y in zip(a, part):
    np.testing.assert_array_equal(x[100:140], y)
  for other in (sample(1, 1, np.arange(512)), sample(0, 2, np.arange(512))):
    assert any(not np.array_equal(x, y) for x, y in zip(a, other))


def test_draws_have_the_authors_ranges_and_rates():
  draws = sample(0, 0, np.arange(20_000))
  assert draws.crop_top.min() == 0 and draws.crop_top.max() == 8
  assert set(np.unique(draws.crop_left)) == set(range(9))
  assert draws.cutout_top.min() == -8 and draws.cutout_top.max() == 23  # uniform in [-8, 32 - 8)
  assert set(np.unique(draws.cutout_left)) == set(range(-8, 24))
  assert 0.48 < draws.flip.mean() < 0.52 and 0.48 < draws.cutout.mean() < 0.52
  assert abs(np.corrcoef(draws.flip, draws.cutout)[0, 1]) < 0.03
