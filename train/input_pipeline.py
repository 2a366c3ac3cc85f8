"""Input pipeline: the host reads and batches; it never touches a pixel in the hot loop.

Sources are TFDS array_record datasets, read without TensorFlow through
`tfds.data_source` (prepared once with `tfds build NAME
--file_format=array_record`), MNIST and Fashion-MNIST from their published
IDX files (`train/idx.py`: no TFDS, no download), or scikit-learn's bundled
digits. A split that
fits in memory (`max_in_memory_bytes`) is decoded once, in parallel, into one
array of images in their stored dtype (uint8; float32 for the digits) and one
of int32 labels, and may be cached as a `.npz` file keyed by dataset, split,
version and preprocessing, so later runs and resumes skip decoding. Every
record is checked while it is decoded (readable, the right shape, a label in
range, finite pixels), so a bad one is named by split and index before
anything compiles. A split too large for memory is streamed record by record
with the same semantics.

Each host yields its contiguous block of every global batch (`per_host_batch
* process_count` examples of the epoch's permutation): one gather per batch.
The epoch's order is a function of `(seed, epoch)` alone, so the position in
the data is the training step, and augmentation, which needs each example's
position in the epoch, runs on the device (`train/augment.py`).
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import warnings
import zipfile
from typing import Iterator
from typing import Optional
from typing import Union

import grain
import numpy as np

from train import idx
from train import run_files

# Per-channel statistics of the training sets, as the authors' loaders compute them.
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
MNIST_STATS = ((0.1307,), (0.3081,))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# Part of every cache key: bump it when the decode-time preprocessing changes.
PREPROCESSING_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the pipeline needs to know about a dataset.

  Attributes:
    num_classes: number of classes.
    image_shape: (height, width, channels) after preprocessing.
    mean, std: per-channel normalization (None: computed from the train split).
    augment: "cifar" (crop 32 pad 4, flip, Cutout), "cutout" (Cutout only),
      "flip_cutout" (flip, Cutout) or "none"; applied on the device.
    train_split, eval_split: TFDS split names.
    resize_to_square: pad to a square and resize to `image_shape` when decoding (Food101).
  """

  num_classes: int
  image_shape: tuple[int, int, int]
  mean: Optional[tuple[float, ...]]
  std: Optional[tuple[float, ...]]
  augment: str
  train_split: str = "train"
  eval_split: str = "test"
  resize_to_square: bool = False


DATASETS = {
  "digits": DatasetSpec(10, (8, 8, 1), None, None, "none"),
  "cifar10": DatasetSpec(10, (32, 32, 3), *CIFAR10_STATS, "cifar"),
  "cifar100": DatasetSpec(100, (32, 32, 3), *CIFAR100_STATS, "cifar"),
  "fashion_mnist": DatasetSpec(10, (28, 28, 1), *FASHION_MNIST_STATS, "cutout"),
  "mnist": DatasetSpec(10, (28, 28, 1), *MNIST_STATS, "none"),
  "food101": DatasetSpec(
    101, (32, 32, 3), *IMAGENET_STATS, "flip_cutout", eval_split="validation", resize_to_square=True
  ),
}


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not where the trainer looked."""


class RecordError(ValueError):
  """A dataset record that cannot be used, named by its split and index."""


class DataMismatch(ValueError):
  """Data that cannot serve the run as configured (too few examples for a batch, say)."""


def get_spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(DATASETS)}.")
  return DATASETS[name]


class ArraySource:
  """A random-access source over in-memory images and labels."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.images[index], "label": self.labels[index]}


def digits_sources(seed: int = 0, test_fraction: float = 0.2) -> tuple[ArraySource, ArraySource]:
  """scikit-learn's bundled 8x8 digits (no download) with a fixed, seeded split; float32 in [0, 1]."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = (digits.images[..., None] / 16.0).astype(np.float32)  # pixel values are 0..16
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(labels))
  n_test = int(round(test_fraction * len(labels)))
  test, train = order[:n_test], order[n_test:]
  return ArraySource(images[train], labels[train]), ArraySource(images[test], labels[test])


def resolve_data_dir(data_dir: Optional[str]) -> str:
  return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def tfds_source(name: str, split: str, data_dir: Optional[str]):
  """`tfds.data_source` for a prepared array_record dataset, or a clear error."""
  import tensorflow_datasets as tfds

  data_dir = resolve_data_dir(data_dir)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as error:  # tfds raises several types here; all mean "not usable".
    raise DatasetNotFoundError(
      f"Dataset {name!r} (split {split!r}) is not prepared in {os.path.join(data_dir, name)}."
      f" Prepare it once on a machine with internet (it needs TensorFlow for the build only):"
      f" pip install tensorflow tensorflow-datasets && tfds build {name} --file_format=array_record"
      f" --data_dir={data_dir} ; then pass --config.data_dir={data_dir} or set TFDS_DATA_DIR."
      f" ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    ) from error


def idx_sources(name: str, spec: DatasetSpec, files: idx.IdxFiles) -> tuple[ArraySource, ArraySource]:
  """The train and test splits of an IDX dataset, read and checked whole (`train/idx.py`)."""
  return tuple(
    ArraySource(*idx.read_split(*paths, spec.image_shape[:2], spec.num_classes)) for paths in (files.train, files.test)
  )


def open_sources(name: str, spec: DatasetSpec, data_dir: Optional[str]) -> tuple[tuple, str]:
  """`((train source, eval source), origin)`: where dataset `name` is read from, and that place in words.

  MNIST and Fashion-MNIST come from their four IDX files when `data_dir`
  holds them (`train/idx.py` lists the layouts), else from a prepared TFDS
  copy there. With no `data_dir`: a prepared TFDS copy in ``$TFDS_DATA_DIR``
  or ``~/tensorflow_datasets``, else the IDX files in the first of
  `idx.search_roots()` that holds them. Every other dataset but the digits is
  a prepared TFDS dataset.
  """
  if name == "digits":
    return digits_sources(), "scikit-learn's bundled digits"

  def tfds_sources():
    sources = tuple(tfds_source(name, split, data_dir) for split in (spec.train_split, spec.eval_split))
    return sources, f"{name} from the TFDS dataset in {os.path.join(resolve_data_dir(data_dir), name)}"

  if name not in idx.LAYOUTS:
    return tfds_sources()
  prepared_by_default = not data_dir and os.path.isdir(os.path.join(resolve_data_dir(None), name))
  files = None if prepared_by_default else idx.find_files(name, data_dir)
  if files is not None:
    return idx_sources(name, spec, files), f"{name} from the IDX files in {files.folder}"
  try:
    if data_dir or prepared_by_default:
      return tfds_sources()
    raise DatasetNotFoundError(f"nor a prepared TFDS copy in {os.path.join(resolve_data_dir(None), name)}.")
  except DatasetNotFoundError as not_prepared:
    stems = ", ".join(stem for stems in idx.FILE_STEMS.values() for stem in stems)
    debian = " (Debian ships them: apt-get install dataset-fashion-mnist)" if name == "fashion_mnist" else ""
    raise DatasetNotFoundError(
      f"{name}: its four IDX files ({stems}, plain or .gz) are in none of"
      f" {', '.join([data_dir] if data_dir else idx.search_roots())}{debian}; {not_prepared}"
    ) from None


def pad_and_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Pads to a centered square with zeros, then resizes bilinearly (Food101)."""
  from PIL import Image

  height, width = image.shape[:2]
  side = max(height, width)
  square = np.zeros((side, side, image.shape[2]), image.dtype)
  top, left = (side - height) // 2, (side - width) // 2
  square[top : top + height, left : left + width] = image
  resized = Image.fromarray(square.squeeze(-1) if square.shape[2] == 1 else square).resize(size[::-1], Image.BILINEAR)
  return np.asarray(resized).reshape(*size, image.shape[2])


def read_record(source, split: str, index: int) -> tuple[np.ndarray, int]:
  """`(image, label)` of record `index`, or a `RecordError` naming it."""
  try:
    record = source[index]
    return np.asarray(record["image"]), int(record["label"])
  except Exception as error:
    raise RecordError(f"{split} record {index} cannot be read: {type(error).__name__}: {error}") from error


def prepare_record(spec: DatasetSpec, source, split: str, index: int) -> tuple[np.ndarray, int]:
  """Record `index` as it will be stored: checked, resized where the dataset asks; not augmented.

  Raises `RecordError` naming the record if it cannot be read, its image has
  the wrong shape, or it fails `check_values`.
  """
  image, label = read_record(source, split, index)
  if image.ndim == 2:
    image = image[..., None]
  if spec.resize_to_square and image.ndim == 3:
    image = pad_and_resize(image, spec.image_shape[:2])
  if image.shape != spec.image_shape:
    raise RecordError(f"{split} record {index} has an image of shape {image.shape}, expected {spec.image_shape}.")
  return check_values(spec, image[None], np.array([label]), split, first_index=index)[0], label


def check_values(spec: DatasetSpec, images: np.ndarray, labels: np.ndarray, split: str, *, first_index: int = 0):
  """`images` (float ones as float32) once every label is in range and every float pixel finite and in [0, 1].

  Raises `RecordError` naming the first bad record, numbered from
  `first_index`, and how many there are.
  """
  count = lambda bad: f"{len(bad)} such record{'s' if len(bad) > 1 else ''}"
  if not np.issubdtype(labels.dtype, np.integer):
    raise RecordError(f"{split} labels have dtype {labels.dtype}; expected integers.")
  outside = (labels < 0) | (labels >= spec.num_classes)
  if outside.any():
    bad = np.flatnonzero(outside)
    raise RecordError(
      f"{split} record {first_index + bad[0]} has label {labels[bad[0]]}, outside [0, {spec.num_classes})"
      f" ({count(bad)})."
    )
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise RecordError(f"{split} images have dtype {images.dtype}; expected uint8 or float.")
  images = images.astype(np.float32, copy=False)
  flat = images.reshape(len(images), int(np.prod(images.shape[1:])))
  finite = np.isfinite(flat).all(axis=1)
  if not finite.all():
    bad = np.flatnonzero(~finite)
    raise RecordError(f"{split} record {first_index + bad[0]} has non-finite pixel values ({count(bad)}).")
  # Float images are read as [0, 1] (uint8 / 255): a value outside is a bad record, not a statistic.
  outside = (flat < 0).any(axis=1) | (flat > 1).any(axis=1)
  if outside.any():
    bad = np.flatnonzero(outside)
    raise RecordError(
      f"{split} record {first_index + bad[0]} has pixel values in [{flat[bad[0]].min():g}, {flat[bad[0]].max():g}];"
      f" float images must lie in [0, 1] ({count(bad)})."
    )
  return images


@dataclasses.dataclass(frozen=True)
class Split:
  """A split in memory: `images` [n, height, width, channels] as stored, `labels` int32 [n]."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]


@dataclasses.dataclass(frozen=True)
class StreamedSplit:
  """A split too large for memory, read record by record with the checks of `prepare_record`."""

  spec: DatasetSpec
  source: object
  name: str

  def __len__(self) -> int:
    return len(self.source)

  def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    records = [prepare_record(self.spec, self.source, self.name, int(i)) for i in indices]
    return np.stack([image for image, _ in records]), np.array([label for _, label in records], np.int32)


def check_arrays(spec: DatasetSpec, images: np.ndarray, labels: np.ndarray, split: str) -> Split:
  """An in-memory split, checked as a whole: its shape, then `check_values`.

  Raises `RecordError` naming the first bad record.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[1:] != spec.image_shape or len(images) != len(labels):
    raise RecordError(
      f"{split} images have shape {images.shape} for {len(labels)} labels, expected"
      f" ({len(labels)}, {', '.join(map(str, spec.image_shape))})."
    )
  images = check_values(spec, images, labels, split)
  return Split(np.ascontiguousarray(images), labels.astype(np.int32))


def decode_split(spec: DatasetSpec, source, split: str, *, num_threads: int = 8, progress: bool = True) -> Split:
  """Reads and checks every record of `source` in parallel into one `Split`, with a progress bar."""
  from tqdm.auto import tqdm

  if isinstance(source, ArraySource):
    return check_arrays(spec, source.images, source.labels, split)
  count = len(source)
  if count == 0:
    return Split(np.zeros((0, *spec.image_shape), np.uint8), np.zeros((0,), np.int32))
  first, first_label = prepare_record(spec, source, split, 0)  # its dtype is the split's
  images = np.empty((count, *spec.image_shape), first.dtype)
  labels = np.empty((count,), np.int32)
  images[0], labels[0] = first, first_label
  chunks = [range(max(start, 1), min(start + 256, count)) for start in range(0, count, 256)]

  def decode(chunk: range) -> int:
    for index in chunk:
      image, labels[index] = prepare_record(spec, source, split, index)
      if image.dtype != images.dtype:
        raise RecordError(f"{split} record {index} has dtype {image.dtype}, record 0 has {images.dtype}.")
      images[index] = image
    return len(chunk)

  with (
    concurrent.futures.ThreadPoolExecutor(num_threads) as pool,
    tqdm(total=count, desc=f"decoding {split}", unit="img", disable=not progress, leave=False) as bar,
  ):
    bar.update(1)
    # map() returns in order: the error raised is the lowest bad record's chunk.
    for done in pool.map(decode, chunks):
      bar.update(done)
  return Split(images, labels)


def cache_path(cache_dir: str, name: str, split: str, source, spec: DatasetSpec) -> str:
  """The cache file of a decoded split: keyed by dataset, split, version, size and preprocessing."""
  info = getattr(source, "dataset_info", None)
  key = {
    "dataset": name,
    "split": split,
    "version": str(getattr(info, "version", "unknown")),
    "records": len(source),
    "image_shape": list(spec.image_shape),
    "resize_to_square": spec.resize_to_square,
    "preprocessing": PREPROCESSING_VERSION,
  }
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  safe_split = "".join(c if c.isalnum() else "_" for c in split)
  return os.path.join(cache_dir, f"{name}-{safe_split}-{key['version']}-{digest}.npz")


def load_cached(path: str, spec: DatasetSpec, count: int) -> Optional[Split]:
  """The cached split at `path`, or None if it is missing, unreadable or of another shape."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as cached:
      images, labels = cached["images"], cached["labels"]
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
    warnings.warn(f"decoded cache {path} is unreadable ({type(error).__name__}: {error}); decoding again", stacklevel=2)
    return None
  if images.shape != (count, *spec.image_shape) or labels.shape != (count,):
    warnings.warn(f"decoded cache {path} holds arrays of shape {images.shape}; decoding again", stacklevel=2)
    return None
  return Split(images, labels)


def save_cached(path: str, split: Split) -> None:
  """Writes `split` to `path` atomically: a killed write leaves no file under that name."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    run_files.atomic_write(path, lambda f: np.savez(f, images=split.images, labels=split.labels))
  except OSError as error:
    warnings.warn(f"could not write the decoded cache {path} ({error}); later runs will decode again", stacklevel=2)


def open_split(
  name: str, spec: DatasetSpec, source, split: str, *, cache_dir: Optional[str], max_in_memory_bytes: float
) -> Union[Split, StreamedSplit]:
  """A split in memory (from the cache, or decoded and cached) or, if too large, streamed."""
  if isinstance(source, ArraySource):  # already in memory: checked, never cached
    return decode_split(spec, source, split)
  if len(source) * int(np.prod(spec.image_shape)) > max_in_memory_bytes:
    warnings.warn(
      f"{name} {split}: {len(source)} records exceed max_in_memory_bytes; streaming them from disk", stacklevel=2
    )
    return StreamedSplit(spec, source, split)
  path = cache_path(cache_dir, name, split, source, spec) if cache_dir else None
  cached = load_cached(path, spec, len(source)) if path else None
  if cached is not None:
    return cached
  decoded = decode_split(spec, source, split)
  if path:
    save_cached(path, decoded)
  return decoded


@dataclasses.dataclass(frozen=True)
class LabelNoise:
  """The label noise of a run, as asked for and as realized on its training and validation records."""

  rate: float
  kind: str
  training_rate: float
  validation_rate: Optional[float]

  def describe(self) -> str:
    validation = "" if self.validation_rate is None else f", {self.validation_rate:.4f} of the validation labels"
    return (
      f"{self.kind} label noise {self.rate:g}: {self.training_rate:.4f} of the training labels wrong{validation};"
      " the test split untouched"
    )


@dataclasses.dataclass
class Data:
  """The train and eval splits of a dataset and this host's share of every batch.

  Attributes:
    spec: the dataset's `DatasetSpec`.
    origin: where the data was read from, in words (the run's first lines say it).
    train, eval: the splits (`Split` in memory, or `StreamedSplit`); `eval` is the dataset's test split.
    validation: a fixed part of the training split held out of training (`held_out_parts`), or None.
    label_noise: the label noise applied to `train` and `validation` (`LabelNoise`), or None.
    per_host_batch, per_host_eval_batch: this host's rows of every global batch.
    seed: the run's seed; the epoch's order is a function of `(seed, epoch)`.
    mean, std: per-channel normalization, applied on the device.
    steps_per_epoch: global training steps per epoch (the remainder is dropped).
    eval_steps: batches per evaluation (the last one padded and masked).
  """

  spec: DatasetSpec
  train: Union[Split, StreamedSplit]
  eval: Union[Split, StreamedSplit]
  per_host_batch: int
  per_host_eval_batch: int
  seed: int
  mean: tuple
  std: tuple
  process_index: int = 0
  process_count: int = 1
  origin: str = "arrays given by the caller"
  validation: Optional[Split] = None
  label_noise: Optional[LabelNoise] = None

  @property
  def in_memory(self) -> bool:
    return isinstance(self.train, Split) and isinstance(self.eval, Split)

  @property
  def global_batch(self) -> int:
    return self.per_host_batch * self.process_count

  @property
  def steps_per_epoch(self) -> int:
    return len(self.train) // self.global_batch

  @property
  def eval_steps(self) -> int:
    return self.evaluation_steps(self.eval)

  def evaluation_steps(self, split) -> int:
    """Batches per evaluation of `split` (the last one padded and masked)."""
    return -(-len(split) // (self.per_host_eval_batch * self.process_count))

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The epoch's permutation of the training records, a function of `(seed, epoch)` alone."""
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.train)).astype(np.int32)

  def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """This host's block of every global batch of `epoch` from `start_step` on: stored images, int32 labels."""
    order = self.epoch_order(epoch)
    first_row = self.process_index * self.per_host_batch

    def batch(step: int) -> dict:
      start = step * self.global_batch + first_row
      images, labels = self.train.take(order[start : start + self.per_host_batch])
      return {"image": images, "label": labels}

    return self._batches(batch, range(start_step, self.steps_per_epoch), self.train)

  def eval_batches(self) -> Iterator[dict]:
    """This host's block of every batch of the test split; padding rows repeat the last record with mask 0."""
    return self.evaluation_batches(self.eval)

  def validation_batches(self) -> Iterator[dict]:
    """Likewise for the validation split (which must exist)."""
    return self.evaluation_batches(self.validation)

  def evaluation_batches(self, split) -> Iterator[dict]:
    """This host's block of every evaluation batch of `split`; padding rows repeat the last record with mask 0."""
    count, global_eval_batch = len(split), self.per_host_eval_batch * self.process_count

    def batch(step: int) -> dict:
      start = step * global_eval_batch + self.process_index * self.per_host_eval_batch
      positions = np.arange(start, start + self.per_host_eval_batch)
      images, labels = split.take(np.minimum(positions, count - 1))
      return {"image": images, "label": labels, "mask": (positions < count).astype(np.float32)}

    return self._batches(batch, range(self.evaluation_steps(split)), split)

  @staticmethod
  def _batches(batch, steps: range, split) -> Iterator[dict]:
    if isinstance(split, Split):
      return map(batch, steps)  # one gather per batch: no threads needed
    # Streamed records are read and decoded in background threads, a few batches ahead.
    dataset = grain.MapDataset.range(steps.start, steps.stop).map(batch)
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)))


def balanced_indices(
  labels: np.ndarray, count: int, num_classes: int, *, order_seed: int, excluded: Optional[np.ndarray] = None
) -> np.ndarray:
  """Sorted indices of `count` records, as many of each class as can be (a class short of its share gives way to
  the others), taken in the order of a fixed permutation (`order_seed`), leaving out the `excluded` indices."""
  order = np.random.default_rng(order_seed).permutation(len(labels))
  if excluded is not None:
    order = order[~np.isin(order, excluded)]
  ordered_labels = labels[order]
  # Each record's rank among the records of its class, in the permutation's order: taking the lowest ranks
  # first takes the classes in turn.
  rank = np.zeros(len(order), np.int64)
  for label in range(num_classes):
    members = ordered_labels == label
    rank[members] = np.arange(members.sum())
  return np.sort(order[np.argsort(rank, kind="stable")[:count]])


# The fixed permutations that pick the training subset and the validation split: the same for every run and seed.
SUBSET_ORDER_SEED = 0
VALIDATION_ORDER_SEED = 1


def held_out_parts(
  train: Union[Split, StreamedSplit],
  num_classes: int,
  name: str,
  *,
  train_examples: Optional[int],
  validation_examples: Optional[int],
) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """`(training indices, validation indices or None)` into the training split.

  The validation split is a fixed, class-balanced part of the training split
  (`VALIDATION_ORDER_SEED`); the training records are the rest, or a fixed,
  class-balanced subset of the rest (`SUBSET_ORDER_SEED`) with
  `train_examples`. Without a validation split the subset is what it was
  before validation splits existed.
  """
  for field, count in (("train_examples", train_examples), ("validation_examples", validation_examples)):
    if count is not None and not isinstance(train, Split):
      raise DataMismatch(f"{field} needs the {name!r} training split in memory; it is streamed from disk.")
  total = len(train)
  held_out = validation_examples or 0
  if held_out >= total:
    raise DataMismatch(
      f"validation_examples {held_out} leaves none of the {total} training examples of {name!r} to train on."
    )
  available = total - held_out
  if train_examples is not None and not 0 < train_examples <= available:
    rest = f" after the {held_out} validation examples" if held_out else ""
    raise DataMismatch(
      f"train_examples {train_examples} is not between 1 and the {available} training examples of {name!r}{rest}."
    )
  validation = None
  if validation_examples is not None:
    validation = balanced_indices(train.labels, held_out, num_classes, order_seed=VALIDATION_ORDER_SEED)
  if train_examples is None:
    training = np.arange(total) if validation is None else np.setdiff1d(np.arange(total), validation)
  else:
    training = balanced_indices(
      train.labels, train_examples, num_classes, order_seed=SUBSET_ORDER_SEED, excluded=validation
    )
  return training, validation


LABEL_NOISE_KINDS = ("symmetric", "pairflip")
# Keeps the noise's random stream apart from the epochs' orders, which are drawn from (seed, epoch).
LABEL_NOISE_STREAM = 0x4E4F495345


def noisy_labels(labels: np.ndarray, *, rate: float, kind: str, num_classes: int, seed: int) -> np.ndarray:
  """`labels` with each one replaced by a wrong class with probability `rate`, a fixed function of (seed, index).

  Record ``i`` is relabelled when ``u_i < rate``, with ``u`` uniform draws
  from the run's seed, one per record of `labels`: every method of a seed,
  and a resumed run, see the same wrong labels. Its new label is ``(y_i +
  s_i) mod C``: ``s_i`` uniform in ``1..C-1`` (``symmetric``: any other class,
  equally likely, never its own) or ``1`` (``pairflip``: class ``c`` to
  ``c + 1``, the asymmetric noise of the label-noise literature).

  Args:
    labels: int labels in ``[0, num_classes)``, indexed by record.
    rate: the probability of a wrong label, in ``[0, 1)``.
    kind: ``"symmetric"`` or ``"pairflip"``.
    num_classes: ``C``.
    seed: the run's seed.

  Returns:
    int32 labels of the same shape.

  >>> noisy_labels(np.arange(4) % 2, rate=0.0, kind="symmetric", num_classes=2, seed=0).tolist()
  [0, 1, 0, 1]
  >>> noisy_labels(np.arange(4) % 2, rate=0.999, kind="pairflip", num_classes=2, seed=0).tolist()
  [1, 0, 1, 0]
  """
  if kind not in LABEL_NOISE_KINDS:
    raise ValueError(f"label noise kind {kind!r} is not one of {LABEL_NOISE_KINDS}")
  if not 0 <= rate < 1:
    raise ValueError(f"label noise rate must lie in [0, 1), got {rate}")
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(LABEL_NOISE_STREAM,)))
  relabelled = rng.random(len(labels)) < rate
  shift = rng.integers(1, num_classes, len(labels)) if kind == "symmetric" else np.ones(len(labels), np.int64)
  return np.where(relabelled, (labels + shift) % num_classes, labels).astype(np.int32)


def split_and_relabel(
  train: Union[Split, StreamedSplit],
  num_classes: int,
  name: str,
  *,
  seed: int,
  train_examples: Optional[int],
  validation_examples: Optional[int],
  label_noise: float,
  label_noise_kind: str,
) -> tuple[Split, Optional[Split], Optional[LabelNoise]]:
  """`(training records, validation split or None, LabelNoise or None)` from the whole training split."""
  if label_noise and not isinstance(train, Split):
    raise DataMismatch(f"label_noise needs the {name!r} training split in memory; it is streamed from disk.")
  training, validation = held_out_parts(
    train, num_classes, name, train_examples=train_examples, validation_examples=validation_examples
  )
  labels, noise = train.labels, None
  if label_noise:
    labels = noisy_labels(train.labels, rate=label_noise, kind=label_noise_kind, num_classes=num_classes, seed=seed)
    wrong = labels != train.labels
    noise = LabelNoise(
      rate=label_noise,
      kind=label_noise_kind,
      training_rate=float(wrong[training].mean()),
      validation_rate=None if validation is None else float(wrong[validation].mean()),
    )
  validation_split = None if validation is None else Split(train.images[validation], labels[validation])
  return Split(train.images[training], labels[training]), validation_split, noise


def channel_statistics(images: np.ndarray) -> tuple[tuple, tuple]:
  """Per-channel mean and std of stored images, on the [0, 1] scale."""
  scale = 255.0 if images.dtype == np.uint8 else 1.0
  axes = tuple(range(images.ndim - 1))
  mean = images.mean(axes, dtype=np.float64) / scale
  std = images.std(axes, dtype=np.float64) / scale
  return tuple(mean.tolist()), tuple(std.tolist())


def create_data(
  name: str,
  *,
  global_batch: int,
  global_eval_batch: int,
  seed: int,
  data_dir: Optional[str] = None,
  cache_dir: Optional[str] = None,
  max_in_memory_bytes: float = 32 * 2**30,
  process_index: int = 0,
  process_count: int = 1,
  train_examples: Optional[int] = None,
  validation_examples: Optional[int] = None,
  label_noise: float = 0.0,
  label_noise_kind: str = "symmetric",
  augment: Optional[str] = None,
) -> Data:
  """Opens dataset `name` for this host, decoding what fits in memory. Raises before any training on bad input.

  Args:
    data_dir: where the dataset is (see `open_sources`); None: the usual places.
    cache_dir: where decoded TFDS splits are cached; None caches nothing.
    max_in_memory_bytes: splits larger than this (as uint8) are streamed from disk.
    train_examples: train on this fixed, class-balanced subset of the training split (None: all of it).
    validation_examples: hold out this fixed, class-balanced part of the training split, the same for every
      seed, as the validation split (None: none); the training records are taken from the rest.
    label_noise, label_noise_kind: give this fraction of the training and validation records a wrong label
      (`noisy_labels`: a function of the seed and the record's index in the training split); never the test
      split's.
    augment: the device augmentation (one of `augment.AUGMENTATIONS`) instead of the dataset's own.
  """
  spec = get_spec(name)
  if augment is not None:
    spec = dataclasses.replace(spec, augment=augment)
  for what, batch in (("batch_size", global_batch), ("eval_batch_size", global_eval_batch)):
    if batch % process_count:
      raise DataMismatch(f"{what} {batch} is not divisible by the {process_count} processes.")
  sources, origin = open_sources(name, spec, data_dir)
  train, eval_ = (
    open_split(name, spec, source, role, cache_dir=cache_dir, max_in_memory_bytes=max_in_memory_bytes)
    for source, role in zip(sources, ("train", "eval"))
  )
  for role, split in (("train", train), ("eval", eval_)):
    if len(split) == 0:
      raise RecordError(f"the {role} split of {name!r} is empty.")
  validation, noise = None, None
  if train_examples is not None or validation_examples is not None or label_noise:
    train, validation, noise = split_and_relabel(
      train,
      spec.num_classes,
      name,
      seed=seed,
      train_examples=train_examples,
      validation_examples=validation_examples,
      label_noise=label_noise,
      label_noise_kind=label_noise_kind,
    )
  if train_examples is not None:
    origin += f"; {train_examples} training examples of {len(sources[0])} (a fixed class-balanced subset)"
  if validation is not None:
    origin += f"; {len(validation)} more held out of training as the validation split (fixed, class-balanced)"
  if noise is not None:
    origin += f"; {noise.describe()}"
  if spec.mean is not None:
    mean, std = spec.mean, spec.std
  elif isinstance(train, Split):
    mean, std = channel_statistics(train.images)
  else:
    raise DataMismatch(f"{name!r} has no normalization statistics and is too large to compute them in memory.")
  data = Data(
    spec=spec,
    origin=origin,
    train=train,
    eval=eval_,
    per_host_batch=global_batch // process_count,
    per_host_eval_batch=global_eval_batch // process_count,
    seed=seed,
    mean=mean,
    std=std,
    process_index=process_index,
    process_count=process_count,
    validation=validation,
    label_noise=noise,
  )
  if data.steps_per_epoch < 1:
    raise DataMismatch(f"batch_size {global_batch} is larger than the {len(train)} training examples of {name!r}.")
  return data
