"""The validation split, label noise and the test split's schedule: the data each seed sees, and the trainer's use."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from tests.helpers import assert_same_checkpoint
from tests.helpers import read_csv
from tests.helpers import small_config
from tests.test_idx import write_dataset
from train import config_checks
from train import input_pipeline as ip
from train import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def indexed_split(counts):
  """A toy training split whose image is its record's index, `counts[c]` records of class c, classes interleaved."""
  labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
  labels = labels[np.random.default_rng(123).permutation(len(labels))]
  return ip.Split(np.arange(len(labels))[:, None, None, None], labels.astype(np.int32))


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_the_realized_noise_rate_is_within_its_binomial_spread(kind, rate):
  labels = np.arange(20000) % 10
  for seed in range(3):
    wrong = ip.noisy_labels(labels, rate=rate, kind=kind, num_classes=10, seed=seed) != labels
    # Each label is wrong with probability `rate`, independently: a two-sided binomial test at 0.001.
    assert stats.binomtest(int(wrong.sum()), len(labels), rate).pvalue > 1e-3, (seed, wrong.mean())


def test_symmetric_noise_never_keeps_a_label_and_spreads_over_the_other_classes():
  labels = np.arange(50000) % 10
  noisy = ip.noisy_labels(labels, rate=0.999, kind="symmetric", num_classes=10, seed=0)
  changed = noisy != labels
  assert changed.mean() > 0.99
  shifts = (noisy[changed] - labels[changed]) % 10
  assert set(np.unique(shifts)) == set(range(1, 10))  # never 0: no label mapped to itself
  assert stats.chisquare(np.bincount(shifts, minlength=10)[1:]).pvalue > 1e-3  # uniform over the 9 others


def test_pairflip_moves_class_c_to_c_plus_1():
  labels = np.arange(1000) % 10
  noisy = ip.noisy_labels(labels, rate=0.5, kind="pairflip", num_classes=10, seed=3)
  changed = noisy != labels
  np.testing.assert_array_equal(noisy[changed], (labels[changed] + 1) % 10)


def test_noise_is_a_function_of_the_seed_and_the_record_index():
  labels = np.arange(5000) % 10
  first = ip.noisy_labels(labels, rate=0.4, kind="symmetric", num_classes=10, seed=7)
  np.testing.assert_array_equal(first, ip.noisy_labels(labels, rate=0.4, kind="symmetric", num_classes=10, seed=7))
  assert (first != ip.noisy_labels(labels, rate=0.4, kind="symmetric", num_classes=10, seed=8)).mean() > 0.3
  # A subset, a validation split and the noise: each kept record carries the noisy label of its own index.
  split = indexed_split([500] * 10)
  train_part, validation, noise = ip.split_and_relabel(
    split,
    10,
    "toy",
    seed=7,
    train_examples=1000,
    validation_examples=500,
    label_noise=0.4,
    label_noise_kind="symmetric",
  )
  expected = ip.noisy_labels(split.labels, rate=0.4, kind="symmetric", num_classes=10, seed=7)
  for part in (train_part, validation):
    np.testing.assert_array_equal(part.labels, expected[part.images[:, 0, 0, 0]])
  wrong = expected != split.labels
  assert noise.training_rate == pytest.approx(wrong[train_part.images[:, 0, 0, 0]].mean())
  assert noise.validation_rate == pytest.approx(wrong[validation.images[:, 0, 0, 0]].mean())


def test_bad_noise_arguments_are_refused():
  for rate in (-0.1, 1.0, math.nan):
    with pytest.raises(ValueError, match="label noise rate must lie in"):
      ip.noisy_labels(np.zeros(3, int), rate=rate, kind="symmetric", num_classes=10, seed=0)
  with pytest.raises(ValueError, match="label noise kind 'flip' is not one of"):
    ip.noisy_labels(np.zeros(3, int), rate=0.1, kind="flip", num_classes=10, seed=0)


def test_the_validation_split_is_balanced_fixed_and_apart_from_the_training_records():
  split = indexed_split([60] * 9 + [30])  # class 9 is short
  training, validation = ip.held_out_parts(split, 10, "toy", train_examples=200, validation_examples=100)
  assert np.bincount(split.labels[validation], minlength=10).tolist() == [10] * 10
  assert np.bincount(split.labels[training], minlength=10).tolist() == [20] * 10
  assert not set(training) & set(validation)
  again = ip.held_out_parts(split, 10, "toy", train_examples=200, validation_examples=100)
  np.testing.assert_array_equal(training, again[0])
  np.testing.assert_array_equal(validation, again[1])
  # Without a subset, every record not held out trains.
  rest, held_out = ip.held_out_parts(split, 10, "toy", train_examples=None, validation_examples=100)
  assert sorted([*rest, *held_out]) == list(range(len(split)))


def test_the_training_subset_is_balanced_and_the_same_for_every_seed():
  split = indexed_split([50] * 9 + [5])  # class 9 is short: it gives way to the others
  subset, validation = ip.held_out_parts(split, 10, "toy", train_examples=95, validation_examples=None)
  assert validation is None
  assert np.bincount(split.labels[subset], minlength=10).tolist() == [10] * 9 + [5]
  assert (
    np.bincount(
      split.labels[ip.held_out_parts(split, 10, "toy", train_examples=20, validation_examples=None)[0]]
    ).tolist()
    == [2] * 10
  )
  with pytest.raises(ip.DataMismatch, match="train_examples 456 is not between 1 and the 455 training examples"):
    ip.held_out_parts(split, 10, "toy", train_examples=456, validation_examples=None)
  with pytest.raises(ip.DataMismatch, match="the 355 training examples of 'toy' after the 100 validation examples"):
    ip.held_out_parts(split, 10, "toy", train_examples=400, validation_examples=100)
  with pytest.raises(ip.DataMismatch, match="validation_examples 455 leaves none of the 455 training examples"):
    ip.held_out_parts(split, 10, "toy", train_examples=None, validation_examples=455)


def test_the_test_split_is_never_relabelled_and_the_validation_split_is_the_same_for_every_seed(tmp_path):
  arrays = write_dataset(tmp_path, n_train=400, n_test=50)
  opened = {
    seed: ip.create_data(
      "fashion_mnist",
      global_batch=10,
      global_eval_batch=10,
      seed=seed,
      data_dir=str(tmp_path),
      validation_examples=100,
      label_noise=0.5,
    )
    for seed in (0, 1)
  }
  for data in opened.values():
    np.testing.assert_array_equal(data.eval.labels, arrays["test"][1])
    np.testing.assert_array_equal(data.eval.images[..., 0], arrays["test"][0])
    assert len(data.train) == 300 and len(data.validation) == 100
  np.testing.assert_array_equal(opened[0].validation.images, opened[1].validation.images)
  assert (opened[0].validation.labels != opened[1].validation.labels).any()  # each seed's own noise
  assert "symmetric label noise 0.5:" in opened[0].origin and "the test split untouched" in opened[0].origin


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("label_noise", -0.1, "label_noise must be a fraction in [0, 1), got -0.1"),
    ("label_noise", 1.0, "label_noise must be a fraction in [0, 1), got 1.0"),
    ("label_noise", math.nan, "label_noise must be a fraction in [0, 1), got nan"),
    ("label_noise_kind", "flip", "label_noise_kind 'flip' is not one of ('symmetric', 'pairflip')"),
    ("validation_examples", 0, "validation_examples must be >= 1 (or None), got 0"),
    ("test_every_epochs", 0, "test_every_epochs must be >= 1, got 0"),
  ],
)
def test_bad_fields_are_named_up_front(field, value, message):
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.check_config(small_config(**{field: value}), device_count=None)
  assert str(error.value) == f"Bad config: {message}."


def test_a_bad_noise_rate_is_one_line_before_anything_is_written(tmp_path):
  workdir = tmp_path / "run"
  command = [sys.executable, str(REPO / "train" / "main.py"), "--workdir", str(workdir), "--config.label_noise=nan"]
  result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == ["error: Bad config: label_noise must be a fraction in [0, 1), got nan."]
  assert not workdir.exists()


def noisy_config(**overrides):
  return small_config(
    num_epochs=4, validation_examples=300, label_noise=0.3, test_every_epochs=3, augment="flip_cutout", **overrides
  )


def test_a_noisy_run_resumes_with_the_same_labels_and_evaluates_the_test_split_when_due(tmp_path, capsys):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(noisy_config(), straight)
  output = capsys.readouterr().out.splitlines()
  first_line = output[0]
  # How long: once after the first steps, then after every epoch but the last.
  assert len([line for line in output if line.startswith("estimated: about ")]) == 1
  epochs = [line for line in output if line.startswith("epoch ")]
  assert [bool(re.search(r"\| about [\d h]+(s|min) left$", line)) for line in epochs] == [True, True, True, False]
  train.train_and_evaluate(noisy_config(halt_after_epochs=2), resumed)
  train.train_and_evaluate(noisy_config(), resumed)
  assert_same_checkpoint(straight, resumed)
  rows = read_csv(straight)
  assert len(read_csv(resumed)) == len(rows)
  for row_a, row_b in zip(rows, read_csv(resumed)):
    for column in ("train_loss", "train_acc", "holdout_acc", "val_acc"):
      assert row_a[column] == row_b[column]
  # The test split after the 3rd and the last epoch, and after each epoch with a new best validation accuracy.
  validation = [float(row["holdout_acc"]) for row in rows]
  new_best = {e for e in range(4) if validation[e] > max(validation[:e], default=-1)}
  evaluated = {e for e, row in enumerate(rows) if not math.isnan(float(row["val_acc"]))}
  assert evaluated == {2, 3} | new_best
  # The realized rate: in data.json and the run's first line, and the fraction of training labels changed.
  clean = ip.create_data("digits", global_batch=64, global_eval_batch=128, seed=42, validation_examples=300)
  noisy = ip.create_data(
    "digits", global_batch=64, global_eval_batch=128, seed=42, validation_examples=300, label_noise=0.3
  )
  np.testing.assert_array_equal(clean.train.images, noisy.train.images)
  realized = float((clean.train.labels != noisy.train.labels).mean())
  with open(os.path.join(straight, "data.json")) as f:
    described = json.load(f)
  assert described["label_noise"]["training_rate"] == pytest.approx(realized)
  assert (described["training_examples"], described["validation_examples"]) == (len(clean.train), 300)
  assert f"symmetric label noise 0.3: {realized:.4f} of the training labels wrong" in first_line


def test_a_run_started_before_a_field_existed_resumes(tmp_path):
  config = small_config()
  saved = json.loads(config.to_json_best_effort())
  for new_field in ("validation_examples", "label_noise", "label_noise_kind", "test_every_epochs"):
    del saved[new_field]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config_checks.check_resumable(config, str(tmp_path))  # the missing fields are their defaults
  with pytest.raises(config_checks.ConfigError, match="fields label_noise differ"):
    config_checks.check_resumable(small_config(label_noise=0.2), str(tmp_path))
