"""The host pipeline: decoding, checks, the decoded cache, determinism, host sharding, TFDS mock data."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from train import input_pipeline as ip


def index_source(n=40, shape=(4, 4, 1)):
  """Each image holds its record index (mod 256), so batches can be traced back."""
  images = np.stack([np.full(shape, i % 256, np.uint8) for i in range(n)])
  return ip.ArraySource(images, np.arange(n, dtype=np.int32) % 10)


SPEC = ip.DatasetSpec(10, (4, 4, 1), (0.0,), (1.0,), "none")


def make_data(source, batch=8, process_index=0, process_count=1, seed=0, streamed=False):
  split = ip.StreamedSplit(SPEC, RecordSource(source), "train") if streamed else ip.decode_split(SPEC, source, "train")
  return ip.Data(
    SPEC,
    split,
    split,
    batch // process_count,
    batch // process_count,
    seed,
    (0.0,),
    (1.0,),
    process_index,
    process_count,
  )


def record_ids(batches):
  return [batch["image"][:, 0, 0, 0].astype(int).tolist() for batch in batches]


def test_batches_are_stored_images_and_int32_labels():
  batch = next(make_data(index_source()).train_batches(0))
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (8, 4, 4, 1)
  assert batch["label"].dtype == np.int32
  np.testing.assert_array_equal(batch["label"], batch["image"][:, 0, 0, 0] % 10)


def test_epochs_are_deterministic_and_resumable_mid_epoch():
  data = make_data(index_source())
  full = record_ids(data.train_batches(3))
  assert len(full) == data.steps_per_epoch == 5
  assert record_ids(data.train_batches(3)) == full
  assert record_ids(data.train_batches(3, start_step=2)) == full[2:]
  assert record_ids(data.train_batches(4)) != full
  assert sorted(sum(full, [])) == list(range(40))


@pytest.mark.parametrize("streamed", [False, True])
def test_one_host_and_two_simulated_hosts_read_the_same_global_batches(streamed):
  source = index_source(n=44)  # 44 // 8 = 5 steps; 4 records dropped
  single = record_ids(make_data(source, streamed=streamed).train_batches(1))
  hosts = [
    record_ids(make_data(source, process_index=i, process_count=2, streamed=streamed).train_batches(1))
    for i in range(2)
  ]
  assert len(hosts[0]) == len(hosts[1]) == 5
  for step in range(5):
    # Host 0 holds the first half of the single-host batch, host 1 the second.
    assert hosts[0][step] + hosts[1][step] == single[step]


def test_streamed_split_gives_the_in_memory_batches():
  source = index_source(n=44)
  assert record_ids(make_data(source, streamed=True).train_batches(2, 1)) == record_ids(
    make_data(source).train_batches(2, 1)
  )
  in_memory, streamed = make_data(source).eval_batches(), make_data(source, streamed=True).eval_batches()
  for a, b in zip(in_memory, streamed, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_record_once_with_a_mask(process_count):
  source = index_source(n=21)
  hosts = [make_data(source, process_index=i, process_count=process_count) for i in range(process_count)]
  assert hosts[0].eval_steps == 3
  batches = [b for data in hosts for b in data.eval_batches()]
  masks = np.concatenate([b["mask"] for b in batches])
  ids = np.concatenate([b["image"][:, 0, 0, 0] for b in batches])
  assert masks.sum() == 21 and len(masks) == 24
  assert sorted(ids[masks == 1].astype(int)) == list(range(21))


class RecordSource:
  """A record-by-record source (like tfds.data_source) over an ArraySource; counts its reads."""

  def __init__(self, source, broken=()):
    self.source, self.broken, self.reads = source, set(broken), 0

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    self.reads += 1
    if index in self.broken:
      raise OSError("bad CRC")
    return self.source[index]


def test_decoding_record_by_record_equals_the_arrays():
  source = index_source(n=600)  # more than one chunk of the parallel decoder
  decoded = ip.decode_split(SPEC, RecordSource(source), "train", progress=False)
  np.testing.assert_array_equal(decoded.images, source.images)
  np.testing.assert_array_equal(decoded.labels, source.labels)
  assert decoded.images.dtype == np.uint8 and decoded.labels.dtype == np.int32


def bad_sources():
  """(source, message) pairs, each with one bad record among good ones."""
  images = np.zeros((600, 4, 4, 1), np.uint8)
  labels = np.zeros(600, np.int32)
  bad_label = labels.copy()
  bad_label[417] = 12
  floats = images.astype(np.float32)
  floats[333, 1, 2] = np.nan
  shapes = [np.zeros((4, 4, 1), np.uint8)] * 600
  shapes[3] = np.zeros((5, 4, 1), np.uint8)
  return [
    (ip.ArraySource(images, bad_label), r"train record 417 has label 12, outside \[0, 10\)"),
    (ip.ArraySource(floats, labels), "train record 333 has non-finite pixel values"),
    (ip.ArraySource(shapes, labels), r"train record 3 has an image of shape \(5, 4, 1\)"),
    (
      RecordSource(ip.ArraySource(images, labels), broken=[257, 300]),
      "train record 257 cannot be read: OSError: bad CRC",
    ),
  ]


@pytest.mark.parametrize("case", range(4))
def test_bad_records_are_named_when_decoded(case):
  source, message = bad_sources()[case]
  with pytest.raises(ip.RecordError, match=message):
    ip.decode_split(
      SPEC, RecordSource(source) if isinstance(source, ip.ArraySource) else source, "train", progress=False
    )


def test_bad_in_memory_arrays_are_named():
  images = np.zeros((10, 4, 4, 1), np.float32)
  labels = np.arange(10, dtype=np.int32)
  labels[7] = 12
  with pytest.raises(ip.RecordError, match=r"eval record 7 has label 12, outside \[0, 10\) \(1 such record\)"):
    ip.check_arrays(SPEC, images, labels, "eval")
  images[[2, 5]] = np.inf
  with pytest.raises(ip.RecordError, match=r"train record 2 has non-finite pixel values \(2 such records\)"):
    ip.check_arrays(SPEC, images, np.zeros(10, np.int32), "train")


class VersionedSource(RecordSource):
  class dataset_info:  # noqa: N801 (the attribute name tfds uses)
    version = "3.0.2"


def test_decoded_cache_is_reused_and_rebuilt_when_the_preprocessing_changes(tmp_path):
  source = VersionedSource(index_source(n=40, shape=(4, 4, 1)))
  first = ip.open_split("toy", SPEC, source, "train", cache_dir=str(tmp_path), max_in_memory_bytes=1e9)
  assert source.reads == 40 and len(os.listdir(tmp_path)) == 1
  again = ip.open_split("toy", SPEC, source, "train", cache_dir=str(tmp_path), max_in_memory_bytes=1e9)
  assert source.reads == 40  # read from the cache, not the source
  np.testing.assert_array_equal(again.images, first.images)
  resized = ip.DatasetSpec(10, (2, 2, 1), (0.0,), (1.0,), "none", resize_to_square=True)
  small = ip.open_split("toy", resized, source, "train", cache_dir=str(tmp_path), max_in_memory_bytes=1e9)
  assert source.reads == 80 and small.images.shape == (40, 2, 2, 1)
  assert len(os.listdir(tmp_path)) == 2


def test_damaged_cache_is_decoded_again(tmp_path):
  source = VersionedSource(index_source(n=40))
  ip.open_split("toy", SPEC, source, "train", cache_dir=str(tmp_path), max_in_memory_bytes=1e9)
  (path,) = tmp_path.iterdir()
  path.write_bytes(path.read_bytes()[:100])
  with pytest.warns(UserWarning, match="is unreadable"):
    split = ip.open_split("toy", SPEC, source, "train", cache_dir=str(tmp_path), max_in_memory_bytes=1e9)
  np.testing.assert_array_equal(split.images, source.source.images)
  assert source.reads == 80
  assert ip.load_cached(str(path), SPEC, 40) is not None  # rewritten whole
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_split_larger_than_the_memory_limit_is_streamed(tmp_path):
  source = VersionedSource(index_source(n=40))
  with pytest.warns(UserWarning, match="streaming"):
    split = ip.open_split("toy", SPEC, source, "train", cache_dir=str(tmp_path), max_in_memory_bytes=100)
  assert isinstance(split, ip.StreamedSplit) and source.reads == 0 and not list(tmp_path.iterdir())


def test_digits_split_is_fixed():
  train, test = ip.digits_sources()
  again_train, _ = ip.digits_sources()
  assert len(train) + len(test) == 1797 and len(test) == 359
  np.testing.assert_array_equal(train.labels, again_train.labels)
  assert train.images.shape[1:] == (8, 8, 1) and train.images.max() == 1.0 and train.images.dtype == np.float32


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "fashion_mnist", "food101"])
def test_tfds_datasets_through_mock_data(name, tmp_path):
  spec = ip.get_spec(name)
  # A data_dir without IDX files: Fashion-MNIST's real files, where installed, do not take the mock's place.
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    data = ip.create_data(name, global_batch=8, global_eval_batch=16, seed=0, data_dir=str(tmp_path))
    batches = list(data.train_batches(0))
    evals = list(data.eval_batches())
  assert len(batches) == 3
  for batch in batches:
    assert batch["image"].shape == (8, *spec.image_shape) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32
    assert np.all((batch["label"] >= 0) & (batch["label"] < spec.num_classes))
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


# ---------------------------------------------------------------------------
# Bad records, named before anything trains (tests/test_faults.py runs one through the trainer: nothing is written).
# ---------------------------------------------------------------------------

DIGITS = ip.get_spec("digits")


def digits_train_with(change):
  """The digits' training source with `change(images, labels)` applied to copies of its arrays."""
  source, _ = ip.digits_sources()
  images, labels = source.images.copy(), source.labels.copy()
  change(images, labels)
  return ip.ArraySource(images, labels)


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda images, labels: images.__setitem__((17, 3, 3), np.nan), "train record 17 has non-finite pixel values"),
    (lambda images, labels: images.__setitem__((40, 2, 2), 3e19), r"train record 40 has pixel values in \[0, 3e\+19\]"),
    (lambda images, labels: labels.__setitem__(5, 10), r"train record 5 has label 10, outside \[0, 10\)"),
  ],
  ids=["non-finite pixel", "huge pixel", "label out of range"],
)
def test_a_bad_record_is_named(change, message):
  with pytest.raises(ip.RecordError, match=message):
    ip.decode_split(DIGITS, digits_train_with(change), "train")


@pytest.mark.parametrize("empty", ["train", "eval"])
def test_an_empty_split_is_named(monkeypatch, empty):
  sources = dict(zip(("train", "eval"), ip.digits_sources()))
  sources[empty] = ip.ArraySource(sources[empty].images[:0], sources[empty].labels[:0])
  monkeypatch.setattr(ip, "digits_sources", lambda: (sources["train"], sources["eval"]))
  with pytest.raises(ip.RecordError, match=f"the {empty} split of 'digits' is empty"):
    ip.create_data("digits", global_batch=64, global_eval_batch=128, seed=0)


def test_an_unreadable_record_is_named_in_memory_and_streamed():
  source, _ = ip.digits_sources()
  with pytest.raises(ip.RecordError, match="train record 123 cannot be read: OSError: bad CRC"):
    ip.decode_split(DIGITS, RecordSource(source, broken=[123]), "train")
  # Streamed (a split too large for memory), the record is named when a batch reads it.
  streamed = ip.StreamedSplit(DIGITS, RecordSource(source, broken=[123]), "train")
  with pytest.raises(ip.RecordError, match="train record 123 cannot be read"):
    streamed.take(np.arange(120, 130))
