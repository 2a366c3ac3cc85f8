"""The input pipeline: augmentations on known images, determinism, host sharding, TFDS mock data."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from train import input_pipeline as ip


class ScriptedRng:
  """Stands in for np.random.Generator with chosen draws."""

  def __init__(self, randoms=(), integers=()):
    self.randoms, self.integer_draws = list(randoms), list(integers)

  def random(self):
    return self.randoms.pop(0)

  def integers(self, low, high=None, size=None):
    if size is None:
      value = self.integer_draws.pop(0)
      assert low <= value < high
      return value
    values = np.array([self.integer_draws.pop(0) for _ in range(size)])
    assert np.all((low <= values) & (values < (high if high is not None else low)))
    return values


IMAGE = np.arange(32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3) + 1


def test_flip_is_a_flip():
  flipped = ip.random_flip(IMAGE, ScriptedRng(randoms=[0.2]))
  np.testing.assert_array_equal(flipped[:, 0], IMAGE[:, 31])
  np.testing.assert_array_equal(flipped[5, 7], IMAGE[5, 24])
  np.testing.assert_array_equal(ip.random_flip(IMAGE, ScriptedRng(randoms=[0.7])), IMAGE)


@pytest.mark.parametrize("top, left", [(0, 0), (8, 8), (4, 0), (0, 8), (3, 6)])
def test_crop_stays_in_bounds_and_is_a_window_of_the_padded_image(top, left):
  crop = ip.random_crop(IMAGE, 4, ScriptedRng(integers=[top, left]))
  assert crop.shape == IMAGE.shape
  padded = np.zeros((40, 40, 3), np.float32)
  padded[4:36, 4:36] = IMAGE
  np.testing.assert_array_equal(crop, padded[top : top + 32, left : left + 32])
  # Offsets 0..8 only: a draw of 9 would leave the padded image.
  with pytest.raises(AssertionError):
    ip.random_crop(IMAGE, 4, ScriptedRng(integers=[9, 0]))


def test_cutout_zeroes_a_16x16_patch():
  out = ip.cutout(IMAGE, 16, ScriptedRng(randoms=[0.1], integers=[5, 10]))
  zero = out == 0
  assert zero.all(axis=-1).sum() == 16 * 16
  assert zero[5:21, 10:26].all() and not zero[4, 10:26].any() and not zero[5:21, 26].any()
  np.testing.assert_array_equal(IMAGE[IMAGE != 0].size, IMAGE.size)  # the input is untouched


@pytest.mark.parametrize("top, left, rows, cols", [(-8, -8, 8, 8), (-3, 20, 13, 12), (23, -1, 9, 15)])
def test_cutout_is_clipped_at_the_border(top, left, rows, cols):
  out = ip.cutout(IMAGE, 16, ScriptedRng(randoms=[0.0], integers=[top, left]))
  zero_pixels = (out == 0).all(axis=-1)
  assert zero_pixels.sum() == rows * cols
  assert zero_pixels[max(top, 0) : max(top, 0) + rows, max(left, 0) : max(left, 0) + cols].all()


def test_cutout_applies_with_probability_half():
  np.testing.assert_array_equal(ip.cutout(IMAGE, 16, ScriptedRng(randoms=[0.6])), IMAGE)
  rng = np.random.default_rng(0)
  applied = np.mean([(ip.cutout(IMAGE, 16, rng) == 0).any() for _ in range(2000)])
  assert 0.46 < applied < 0.54


def index_source(n=40, shape=(4, 4, 1)):
  """Each image holds its record index, so batches can be traced back."""
  images = np.stack([np.full(shape, i, np.float32) for i in range(n)])
  return ip.ArraySource(images, np.arange(n, dtype=np.int32) % 10)


def make_data(source, batch=8, process_index=0, process_count=1, seed=0):
  spec = ip.DatasetSpec(10, (4, 4, 1), (0.0,), (1.0,), "none")
  return ip.Data(spec, source, source, batch // process_count, batch // process_count, seed, (0.0,), (1.0,),
                 process_index, process_count)


def record_ids(batches):
  return [batch["image"][:, 0, 0, 0].astype(int).tolist() for batch in batches]


def test_epochs_are_deterministic_and_resumable_mid_epoch():
  data = make_data(index_source())
  full = record_ids(data.train_epoch(3))
  assert len(full) == data.steps_per_epoch == 5
  assert record_ids(data.train_epoch(3)) == full
  assert record_ids(data.train_epoch(3, start_step=2)) == full[2:]
  assert record_ids(data.train_epoch(4)) != full
  assert sorted(sum(full, [])) == list(range(40))


def test_hosts_read_their_block_of_each_global_batch():
  source = index_source(n=44)  # 44 // 8 = 5 steps; 4 records dropped
  single = record_ids(make_data(source).train_epoch(1))
  hosts = [record_ids(make_data(source, process_index=i, process_count=2).train_epoch(1)) for i in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == 5
  for step in range(5):
    # Host 0 holds the first half of the single-host batch, host 1 the second.
    assert hosts[0][step] + hosts[1][step] == single[step]


def test_eval_batches_cover_every_record_once_with_a_mask():
  data = make_data(index_source(n=21))
  batches = list(data.eval_batches())
  assert len(batches) == data.eval_steps == 3
  masks = np.concatenate([b["mask"] for b in batches])
  ids = np.concatenate([b["image"][:, 0, 0, 0] for b in batches])
  assert masks.sum() == 21
  assert sorted(ids[masks == 1].astype(int)) == list(range(21))


def test_bad_records_are_named():
  images = np.zeros((10, 4, 4, 1), np.float32)
  labels = np.arange(10, dtype=np.int32)
  labels[7] = 12
  data = make_data(ip.ArraySource(images, labels))
  with pytest.raises(ip.RecordError, match=r"train record 7 has label 12, outside \[0, 10\)"):
    ip.check_in_memory_labels(data)
  wrong_shape = ip.ArraySource([np.zeros((4, 4, 1))] * 3 + [np.zeros((5, 4, 1))] + [np.zeros((4, 4, 1))] * 4,
                               np.zeros(8, np.int32))
  preprocess = ip.Preprocessor(data.spec, wrong_shape, "train", (0.0,), (1.0,), train=False)
  with pytest.raises(ip.RecordError, match=r"train record 3 has an image of shape \(5, 4, 1\)"):
    preprocess(3)


def test_digits_split_is_fixed():
  train, test = ip.digits_sources()
  again_train, _ = ip.digits_sources()
  assert len(train) + len(test) == 1797 and len(test) == 359
  np.testing.assert_array_equal(train.labels, again_train.labels)
  assert train.images.shape[1:] == (8, 8, 1) and train.images.max() == 1.0


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "fashion_mnist", "food101"])
def test_tfds_datasets_through_mock_data(name):
  spec = ip.get_spec(name)
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    data = ip.create_data(name, global_batch=8, global_eval_batch=16, seed=0)
    batches = list(data.train_epoch(0))
    evals = list(data.eval_batches())
  assert len(batches) == 3
  for batch in batches:
    assert batch["image"].shape == (8, *spec.image_shape) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert np.all((batch["label"] >= 0) & (batch["label"] < spec.num_classes))
    assert np.all(np.isfinite(batch["image"]))
  assert sum(b["mask"].sum() for b in evals) == 24


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(ip.DatasetNotFoundError) as error:
    ip.create_data("cifar100", global_batch=8, global_eval_batch=8, seed=0, data_dir=str(tmp_path))
  message = str(error.value)
  assert "'cifar100'" in message and str(tmp_path / "cifar100") in message
  assert "tfds build cifar100 --file_format=array_record" in message


def test_unknown_dataset():
  with pytest.raises(ValueError, match="Unknown dataset 'mnist2'"):
    ip.create_data("mnist2", global_batch=8, global_eval_batch=8, seed=0)
