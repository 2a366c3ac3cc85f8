"""MNIST-format IDX files: layouts, the search order, every header check, and a bad file through the trainer."""

import gzip
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from train import idx
from train import input_pipeline as ip

REPO = pathlib.Path(__file__).resolve().parents[1]


def idx_bytes(array: np.ndarray, magic=None) -> bytes:
  """IDX as its authors define it, written here independently of the reader: a big-endian magic
  (0x08 = unsigned byte, then the number of dimensions), each dimension as a big-endian uint32, the bytes."""
  array = np.asarray(array, np.uint8)
  magic = (0x0800 | array.ndim) if magic is None else magic
  header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.tobytes()


def write_dataset(folder, n_train=30, n_test=10, gz=True, seed=0, shape=(28, 28)):
  """The four files of a small random dataset in `folder`; returns its arrays."""
  rng = np.random.default_rng(seed)
  arrays = {
    "train": (rng.integers(0, 256, (n_train, *shape)), np.arange(n_train) % 10),
    "test": (rng.integers(0, 256, (n_test, *shape)), rng.integers(0, 10, n_test)),
  }
  os.makedirs(folder, exist_ok=True)
  for split, (images_stem, labels_stem) in idx.FILE_STEMS.items():
    for stem, array in zip((images_stem, labels_stem), arrays[split]):
      data = idx_bytes(array)
      path = os.path.join(folder, stem + (".gz" if gz else ""))
      with open(path, "wb") as f:
        f.write(gzip.compress(data) if gz else data)
  return arrays


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["", "FashionMNIST/raw"])
def test_the_files_are_read_whole_in_either_layout(tmp_path, gz, layout):
  arrays = write_dataset(tmp_path / layout, gz=gz)
  data = ip.create_data("fashion_mnist", global_batch=10, global_eval_batch=10, seed=0, data_dir=str(tmp_path))
  np.testing.assert_array_equal(data.train.images[..., 0], arrays["train"][0])
  np.testing.assert_array_equal(data.train.labels, arrays["train"][1])
  np.testing.assert_array_equal(data.eval.images[..., 0], arrays["test"][0])
  np.testing.assert_array_equal(data.eval.labels, arrays["test"][1])
  assert data.train.images.dtype == np.uint8 and data.train.labels.dtype == np.int32
  assert data.origin == f"fashion_mnist from the IDX files in {tmp_path / layout}".rstrip("/")


def test_mnist_reads_the_same_format(tmp_path):
  write_dataset(tmp_path / "MNIST" / "raw")
  data = ip.create_data("mnist", global_batch=10, global_eval_batch=10, seed=0, data_dir=str(tmp_path))
  assert len(data.train) == 30 and data.spec.image_shape == (28, 28, 1)


def test_with_no_data_dir_the_first_root_holding_the_files_wins(tmp_path, monkeypatch):
  home, cwd = tmp_path / "home", tmp_path / "cwd"
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  monkeypatch.chdir(tmp_path)
  os.makedirs(cwd)
  monkeypatch.chdir(cwd)
  roots = idx.search_roots()
  assert roots[:4] == [
    str(home / "tensorflow_datasets"),
    str(home / ".keras" / "datasets"),
    str(cwd / "data"),
    str(home / "data"),
  ]
  write_dataset(home / "data" / "FashionMNIST" / "raw", seed=1)
  keras = write_dataset(home / ".keras" / "datasets" / "fashion-mnist", seed=2)
  found = idx.find_files("fashion_mnist", None)
  assert found.folder == str(home / ".keras" / "datasets" / "fashion-mnist")
  data = ip.create_data("fashion_mnist", global_batch=10, global_eval_batch=10, seed=0)
  np.testing.assert_array_equal(data.eval.labels, keras["test"][1])


def test_missing_files_say_where_they_were_looked_for_and_how_to_install_them(tmp_path, monkeypatch):
  monkeypatch.setattr(idx, "search_roots", lambda: [str(tmp_path / "nowhere")])
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  with pytest.raises(ip.DatasetNotFoundError) as error:
    ip.create_data("fashion_mnist", global_batch=10, global_eval_batch=10, seed=0)
  message = str(error.value)
  assert str(tmp_path / "nowhere") in message and "apt-get install dataset-fashion-mnist" in message
  assert "train-images-idx3-ubyte" in message


def damage(path, how):
  raw = path.read_bytes()
  data = gzip.decompress(raw)
  if how == "truncated gzip":
    path.write_bytes(raw[: len(raw) // 2])
  elif how == "corrupt gzip":
    middle = len(raw) // 2
    path.write_bytes(raw[:middle] + bytes([raw[middle] ^ 0xFF]) + raw[middle + 1 :])
  elif how == "truncated payload":
    path.write_bytes(gzip.compress(data[:-5]))
  elif how == "trailing bytes":
    path.write_bytes(gzip.compress(data + b"\0\0"))
  elif how == "wrong magic":
    path.write_bytes(gzip.compress((0x0801).to_bytes(4, "big") + data[4:]))
  elif how == "short header":
    path.write_bytes(gzip.compress(data[:6]))


@pytest.mark.parametrize(
  "how, message",
  [
    ("truncated gzip", r"the gzip stream is truncated or corrupt \(EOFError"),
    ("corrupt gzip", r"the gzip stream is truncated or corrupt"),
    (
      "truncated payload",
      r"the header announces 30 items of shape \(28, 28\) \(23520 bytes\), but the file holds 23515 \(truncated\)",
    ),
    ("trailing bytes", r"the header announces 30 items .* but the file holds 23522 \(trailing bytes\)"),
    ("wrong magic", r"magic number 0x00000801, expected 0x00000803 \(images"),
    ("short header", r"6 bytes, too short for an IDX header of 16 bytes"),
  ],
)
def test_a_damaged_file_is_named_with_its_fault(tmp_path, how, message):
  write_dataset(tmp_path)
  bad = tmp_path / "train-images-idx3-ubyte.gz"
  damage(bad, how)
  with pytest.raises(idx.IdxError, match=f"^{bad}: {message}"):
    ip.create_data("fashion_mnist", global_batch=10, global_eval_batch=10, seed=0, data_dir=str(tmp_path))


def test_counts_dimensions_and_labels_are_checked(tmp_path):
  write_dataset(tmp_path, gz=False)
  labels = tmp_path / "t10k-labels-idx1-ubyte"
  labels.write_bytes(idx_bytes(np.zeros(9)))
  with pytest.raises(idx.IdxError, match="t10k-images-idx3-ubyte holds 10 images but .*t10k-labels-idx1-ubyte holds 9"):
    ip.create_data("fashion_mnist", global_batch=10, global_eval_batch=10, seed=0, data_dir=str(tmp_path))
  labels.write_bytes(idx_bytes([1, 2, 3, 4, 10, 5, 6, 7, 8, 9]))
  with pytest.raises(idx.IdxError, match=r"t10k-labels-idx1-ubyte: label 10 at index 4, outside \[0, 10\)"):
    ip.create_data("fashion_mnist", global_batch=10, global_eval_batch=10, seed=0, data_dir=str(tmp_path))
  write_dataset(tmp_path, gz=False, shape=(32, 32))
  with pytest.raises(idx.IdxError, match=r"items of shape \(32, 32\), expected \(28, 28\)"):
    ip.create_data("fashion_mnist", global_batch=10, global_eval_batch=10, seed=0, data_dir=str(tmp_path))


def test_a_damaged_file_stops_the_trainer_in_one_line_with_nothing_written(tmp_path):
  write_dataset(tmp_path / "data")
  bad = tmp_path / "data" / "t10k-labels-idx1-ubyte.gz"
  damage(bad, "truncated gzip")
  workdir = tmp_path / "run"
  result = subprocess.run(
    [
      sys.executable,
      str(REPO / "train" / "main.py"),
      "--config",
      str(REPO / "train" / "configs" / "fashion_mnist.py"),
      f"--config.data_dir={tmp_path / 'data'}",
      "--config.train_examples=30",
      "--config.batch_size=10",
      "--workdir",
      str(workdir),
    ],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
    f"error: {bad}: the gzip stream is truncated or corrupt"
    " (EOFError: Compressed file ended before the end-of-stream marker was reached)."
  )
  assert "Traceback" not in result.stderr
  assert not workdir.exists()
