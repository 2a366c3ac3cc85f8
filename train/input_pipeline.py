"""Input pipeline: TFDS array_record sources or scikit-learn's digits, read with grain.

No TensorFlow at run time: TFDS datasets are read with `tfds.data_source`
(prepared once with `tfds build NAME --file_format=array_record`), and grain
shuffles, augments and batches them in NumPy. Every epoch is a random-access
`grain.MapDataset` whose order and augmentation are functions of
`(seed, epoch)` alone, so the position in the data is the training step:
checkpointing the step checkpoints the iterator, and a resumed run reads
exactly the batches an uninterrupted one would.

Every host reads its own contiguous block of each global batch
(`per_host_batch * process_count` examples of the epoch's permutation).
"""

import dataclasses
import os
from typing import Iterator, Optional, Sequence

import grain
import numpy as np

# Per-channel statistics of the training sets, as the authors' loaders compute them.
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the pipeline needs to know about a dataset.

  Attributes:
    num_classes: number of classes.
    image_shape: (height, width, channels) after preprocessing.
    mean, std: per-channel normalization (None: computed from the train split).
    augment: "cifar" (crop 32 pad 4, flip, Cutout), "cutout" (Cutout only),
      "flip_cutout" (flip, Cutout) or "none".
    train_split, eval_split: TFDS split names.
    resize_to_square: pad to a square and resize to `image_shape` (Food101).
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
    "food101": DatasetSpec(101, (32, 32, 3), *IMAGENET_STATS, "flip_cutout", eval_split="validation", resize_to_square=True),
}


class DatasetNotFoundError(FileNotFoundError):
  """A TFDS dataset is not prepared where the trainer looked."""


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
  """scikit-learn's bundled 8x8 digits (no download) with a fixed, seeded split."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = (digits.images[..., None] / 16.0).astype(np.float32)  # pixel values are 0..16
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(labels))
  n_test = int(round(test_fraction * len(labels)))
  test, train = order[:n_test], order[n_test:]
  return ArraySource(images[train], labels[train]), ArraySource(images[test], labels[test])


def tfds_source(name: str, split: str, data_dir: Optional[str]):
  """`tfds.data_source` for a prepared array_record dataset, or a clear error."""
  import tensorflow_datasets as tfds

  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
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


def to_float_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  return image.astype(np.float32)


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


def random_crop(image: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
  """Zero-pads by `padding` and crops back to the original size at a random offset."""
  height, width = image.shape[:2]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top, left = rng.integers(0, 2 * padding + 1, size=2)
  return padded[top : top + height, left : left + width]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return image[:, ::-1] if rng.random() < 0.5 else image


def cutout(image: np.ndarray, size: int, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """The authors' Cutout: with probability p, zero a size x size patch clipped at the border.

  The patch's corner is uniform in [-size/2, side - size/2), so patches that
  overhang the border are clipped, as in their code.
  """
  if rng.random() > p:
    return image
  half = size // 2
  height, width = image.shape[:2]
  top = rng.integers(-half, height - half)
  left = rng.integers(-half, width - half)
  image = image.copy()
  image[max(0, top) : min(height, top + size), max(0, left) : min(width, left + size)] = 0
  return image


class RecordError(ValueError):
  """A dataset record that cannot be used, named by its split and index."""


def read_record(source, split: str, index: int) -> tuple[np.ndarray, int]:
  """`(image, label)` of record `index`, or a `RecordError` naming it."""
  try:
    record = source[index]
    return np.asarray(record["image"]), int(record["label"])
  except Exception as error:
    raise RecordError(f"{split} record {index} cannot be read: {type(error).__name__}: {error}") from error


class Preprocessor:
  """Reads record `index` of `source`: a normalized float32 image and an int32 label.

  A record that cannot be read, has an image of the wrong shape or a label
  out of range raises `RecordError` naming the record, on the host, before
  anything reaches XLA.
  """

  def __init__(self, spec: DatasetSpec, source, split: str, mean: Sequence[float], std: Sequence[float], train: bool):
    self.spec, self.source, self.split, self.train = spec, source, split, train
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)

  def __call__(self, index, rng: Optional[np.random.Generator] = None) -> dict:
    index = int(index)
    image, label = read_record(self.source, self.split, index)
    if not 0 <= label < self.spec.num_classes:
      raise RecordError(f"{self.split} record {index} has label {label}, outside [0, {self.spec.num_classes}).")
    if image.ndim == 2:
      image = image[..., None]
    if self.spec.resize_to_square and image.ndim == 3:
      image = pad_and_resize(image, self.spec.image_shape[:2])
    if image.shape != self.spec.image_shape:
      raise RecordError(
          f"{self.split} record {index} has an image of shape {image.shape}, expected {self.spec.image_shape}."
      )
    image = to_float_image(image)
    augment = self.spec.augment if self.train else "none"
    if augment == "cifar":
      image = random_crop(image, 4, rng)
    if augment in ("cifar", "flip_cutout"):
      image = random_flip(image, rng)
    image = (image - self.mean) / self.std
    if augment in ("cifar", "flip_cutout", "cutout"):
      image = cutout(image, 16, rng)
    return {"image": np.ascontiguousarray(image, np.float32), "label": np.int32(label)}


@dataclasses.dataclass
class Data:
  """The train and eval sides of a dataset, ready to iterate.

  Attributes:
    spec: the dataset's `DatasetSpec`.
    steps_per_epoch: global training steps per epoch (the remainder is dropped).
    eval_steps: batches per evaluation (the last one padded and masked).
  """

  spec: DatasetSpec
  train_source: object
  eval_source: object
  per_host_batch: int
  per_host_eval_batch: int
  seed: int
  mean: tuple
  std: tuple
  process_index: int = 0
  process_count: int = 1

  @property
  def steps_per_epoch(self) -> int:
    return len(self.train_source) // (self.per_host_batch * self.process_count)

  @property
  def eval_steps(self) -> int:
    return -(-len(self.eval_source) // (self.per_host_eval_batch * self.process_count))

  def train_epoch(self, epoch: int, start_step: int = 0, num_threads: int = 4) -> Iterator[dict]:
    """The host's batches of `epoch`, from batch `start_step` on."""
    preprocess = Preprocessor(self.spec, self.train_source, "train", self.mean, self.std, train=True)
    order = grain.MapDataset.range(len(self.train_source)).shuffle(seed=_epoch_seed(self.seed, epoch, 0))
    global_batch = self.per_host_batch * self.process_count
    augment_seed = _epoch_seed(self.seed, epoch, 1)

    def example(local_position: int) -> dict:
      # This host's rows of each global batch are one contiguous block of it,
      # and the augmentation draws depend on the global position alone: the
      # batches, and each device's share of them, do not depend on the number
      # of hosts.
      batch, row = divmod(local_position, self.per_host_batch)
      position = batch * global_batch + self.process_index * self.per_host_batch + row
      return preprocess(order[position], np.random.default_rng([augment_seed, position]))

    dataset = (
        grain.MapDataset.range(self.steps_per_epoch * self.per_host_batch)
        .map(example)
        .batch(self.per_host_batch, drop_remainder=True)
    )
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    return iter(dataset[start_step:].to_iter_dataset(options))

  def eval_batches(self, num_threads: int = 4) -> Iterator[dict]:
    """The host's evaluation batches; padding rows have mask 0."""
    preprocess = Preprocessor(self.spec, self.eval_source, "eval", self.mean, self.std, train=False)
    total = self.eval_steps * self.per_host_eval_batch * self.process_count
    length = len(self.eval_source)

    def padded(index: int) -> dict:
      example = preprocess(min(index, length - 1))
      example["mask"] = np.float32(index < length)
      return example

    dataset = (
        grain.MapDataset.range(total)[self.process_index :: self.process_count]
        .map(padded)
        .batch(self.per_host_eval_batch)
    )
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    return iter(dataset.to_iter_dataset(options))


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
  return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def channel_statistics(source, limit: int = 10_000) -> tuple[tuple, tuple]:
  """Per-channel mean and std of up to `limit` training images (NaN pixels ignored)."""
  images = np.stack([to_float_image(read_record(source, "train", i)[0]) for i in range(min(limit, len(source)))])
  axes = tuple(range(images.ndim - 1))
  return tuple(np.nanmean(images, axes).tolist()), tuple(np.nanstd(images, axes).tolist())


def create_data(
    name: str,
    *,
    global_batch: int,
    global_eval_batch: int,
    seed: int,
    data_dir: Optional[str] = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Data:
  """Opens dataset `name` for this host. Raises before any training on bad input."""
  spec = get_spec(name)
  for what, batch in (("batch_size", global_batch), ("eval_batch_size", global_eval_batch)):
    if batch % process_count:
      raise ValueError(f"{what} {batch} is not divisible by the {process_count} processes.")
  if name == "digits":
    train_source, eval_source = digits_sources()
  else:
    train_source = tfds_source(name, spec.train_split, data_dir)
    eval_source = tfds_source(name, spec.eval_split, data_dir)
  mean, std = (spec.mean, spec.std) if spec.mean is not None else channel_statistics(train_source)
  data = Data(
      spec=spec,
      train_source=train_source,
      eval_source=eval_source,
      per_host_batch=global_batch // process_count,
      per_host_eval_batch=global_eval_batch // process_count,
      seed=seed,
      mean=mean,
      std=std,
      process_index=process_index,
      process_count=process_count,
  )
  if data.steps_per_epoch < 1:
    raise ValueError(
        f"batch_size {global_batch} is larger than the {len(train_source)} training examples of {name!r}."
    )
  return data


def check_in_memory_labels(data: Data) -> None:
  """Checks in-memory labels up front; TFDS records are checked as they are read."""
  for split, source in (("train", data.train_source), ("eval", data.eval_source)):
    labels = getattr(source, "labels", None)
    if labels is None:
      continue
    bad = np.flatnonzero((labels < 0) | (labels >= data.spec.num_classes))
    if bad.size:
      raise RecordError(
          f"{split} record {bad[0]} has label {labels[bad[0]]}, outside [0, {data.spec.num_classes})"
          f" ({bad.size} such records)."
      )
