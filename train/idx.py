"""MNIST and Fashion-MNIST from their IDX files, as their authors publish them: no TFDS, no download.

The four files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
`t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each plain or gzipped)
are read from one folder, in the authors' flat layout or in torchvision's
`<root>/FashionMNIST/raw/` (`MNIST/raw/`). With no `data_dir` the folders of
`SEARCH_ROOTS` are tried in order (see `candidate_folders`).

Every header is checked (magic number, dimensions, counts), every byte of the
payload accounted for, the gzip stream read to its end (its CRC included), and
labels range-checked, so a truncated, corrupt or mismatched file is an
`IdxError` naming the file before any model is built.
"""

import gzip
import os
import zlib
from typing import NamedTuple
from typing import Optional

import numpy as np

# IDX magic numbers: unsigned bytes, with 3 dimensions (images) or 1 (labels).
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

FILE_STEMS = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Subfolders of a root that hold the files: torchvision's `raw/` layout, and the names used by the
# authors' repository, Keras's cache and Debian's package.
LAYOUTS = {
  "fashion_mnist": ("", "FashionMNIST/raw", "fashion_mnist", "fashion-mnist"),
  "mnist": ("", "MNIST/raw", "mnist"),
}


class IdxError(ValueError):
  """An IDX file that cannot be used, named with what is wrong."""


class IdxFiles(NamedTuple):
  """The paths of one dataset's four files: ``train`` and ``test`` as (images, labels)."""

  train: tuple[str, str]
  test: tuple[str, str]

  @property
  def folder(self) -> str:
    return os.path.dirname(self.train[0])


def search_roots() -> list[str]:
  """Where `find_files` looks when no `data_dir` is given, in order.

  1. ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` (where a prepared TFDS copy would be);
  2. ``~/.keras/datasets`` (Keras's cache, ``fashion-mnist/``);
  3. ``./data`` and ``~/data`` (the ``root`` of torchvision's examples, ``FashionMNIST/raw/``);
  4. ``/usr/share/datasets`` (Debian's ``dataset-fashion-mnist`` package, ``fashion-mnist/``).
  """
  return [
    os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets"),
    os.path.expanduser("~/.keras/datasets"),
    os.path.abspath("data"),
    os.path.expanduser("~/data"),
    "/usr/share/datasets",
  ]


def _existing(folder: str, stem: str) -> Optional[str]:
  """`folder/stem`, plain if present, else gzipped, else None."""
  for name in (stem, f"{stem}.gz"):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  return None


def files_in(name: str, root: str) -> Optional[IdxFiles]:
  """The four files of dataset `name` under `root` in one of its layouts, or None if no layout holds all four."""
  for layout in LAYOUTS[name]:
    folder = os.path.join(root, layout)
    found = {split: tuple(_existing(folder, stem) for stem in stems) for split, stems in FILE_STEMS.items()}
    if all(path is not None for paths in found.values() for path in paths):
      return IdxFiles(**found)
  return None


def find_files(name: str, data_dir: Optional[str]) -> Optional[IdxFiles]:
  """The four files of `name` in `data_dir` (only there, when given) or in the first of `search_roots` that
  holds them; None if none does."""
  for root in [data_dir] if data_dir else search_roots():
    found = files_in(name, root)
    if found is not None:
      return found
  return None


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip's magic bytes, whatever the file is called
      return gzip.decompress(raw)
    return raw
  except (EOFError, gzip.BadGzipFile, zlib.error) as error:
    raise IdxError(f"{path}: the gzip stream is truncated or corrupt ({type(error).__name__}: {error}).") from None


def read_idx(path: str, magic: int, item_shape: Optional[tuple[int, ...]] = None) -> np.ndarray:
  """The uint8 array stored in IDX file `path`, checked against `magic` and the `item_shape` of one item.

  Raises:
    IdxError: naming `path` and the fault: an unreadable gzip stream, a wrong
      magic number, dimensions other than `item_shape`, or a payload shorter or
      longer than the header says.
  """
  raw = _read_bytes(path)
  dims = magic & 0xFF
  header_bytes = 4 + 4 * dims
  if len(raw) < header_bytes:
    raise IdxError(f"{path}: {len(raw)} bytes, too short for an IDX header of {header_bytes} bytes.")
  found_magic = int.from_bytes(raw[:4], "big")
  if found_magic != magic:
    raise IdxError(
      f"{path}: magic number {found_magic:#010x}, expected {magic:#010x}"
      f" ({'images' if magic == IMAGES_MAGIC else 'labels'}, unsigned bytes, {dims} dimensions)."
    )
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", dims, offset=4))
  if item_shape is not None and shape[1:] != item_shape:
    raise IdxError(f"{path}: items of shape {shape[1:]}, expected {item_shape}.")
  expected = int(np.prod(shape))
  payload = len(raw) - header_bytes
  if payload != expected:
    raise IdxError(
      f"{path}: the header announces {shape[0]} items of shape {shape[1:]} ({expected} bytes), but the file holds"
      f" {payload} ({'truncated' if payload < expected else 'trailing bytes'})."
    )
  return np.frombuffer(raw, np.uint8, expected, offset=header_bytes).reshape(shape)


def read_split(images_path: str, labels_path: str, image_shape: tuple[int, int], num_classes: int):
  """`(images uint8 [n, height, width, 1], labels int32 [n])` of one split, every check passed."""
  images = read_idx(images_path, IMAGES_MAGIC, image_shape)
  labels = read_idx(labels_path, LABELS_MAGIC, ())
  if len(images) != len(labels):
    raise IdxError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels.")
  if len(labels) and labels.max() >= num_classes:
    bad = int(np.argmax(labels >= num_classes))
    raise IdxError(f"{labels_path}: label {labels[bad]} at index {bad}, outside [0, {num_classes}).")
  return images[..., None], labels.astype(np.int32)
