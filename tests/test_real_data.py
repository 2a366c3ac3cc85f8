"""Real Fashion-MNIST from its IDX files: the trainer learns it. CI installs the files; missing there is a failure.

On a developer's machine without the files the tests skip and say how to
install them (Debian's `dataset-fashion-mnist` package).
"""

import os

import numpy as np
import pytest

from train import idx
from train import input_pipeline
from train import train
from train.configs import fashion_mnist

FILES = idx.find_files("fashion_mnist", None)
INSTALL = "apt-get update && apt-get install dataset-fashion-mnist"

if FILES is None:
  if os.environ.get("CI") == "true":
    raise RuntimeError(f"CI must have Fashion-MNIST's IDX files (.ci/run installs them: {INSTALL}).")
  pytest.skip(f"Fashion-MNIST's IDX files are not installed: {INSTALL}", allow_module_level=True)


def test_the_files_are_the_whole_dataset():
  data = input_pipeline.create_data("fashion_mnist", global_batch=128, global_eval_batch=1000, seed=0)
  assert (len(data.train), len(data.eval)) == (60000, 10000)
  assert data.train.images.shape == (60000, 28, 28, 1) and data.train.images.dtype == np.uint8
  assert np.bincount(data.train.labels).tolist() == [6000] * 10
  assert np.bincount(data.eval.labels).tolist() == [1000] * 10
  # The published statistics of the training images, which the dataset's spec normalizes with.
  assert data.train.images.mean() / 255 == pytest.approx(0.2860, abs=1e-4)
  assert data.train.images.std() / 255 == pytest.approx(0.3530, abs=1e-4)


def test_the_comparison_config_learns_the_real_data(tmp_path):
  """AACE-SAM in the comparison's regime, 2 of its 20 epochs (the schedule compressed to them) on the 5,000-image
  subset: half a minute on 2 cores, 81.9% test accuracy here."""
  config = fashion_mnist.get_config("memorize")
  config.num_epochs = 2
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["finished"]
  assert result["val_acc"] > 0.80, result
