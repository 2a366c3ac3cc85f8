"""Production guarantees of the trainer: precision, non-finite steps, preemption, checkpoint faults."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import aace_jax
from tests.helpers import assert_same_checkpoint
from tests.helpers import latest_checkpoint
from tests.helpers import read_csv
from tests.helpers import small_config
from train import checkpointing
from train import config_checks
from train import input_pipeline
from train import models
from train import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_bfloat16_run_matches_float32_accuracy(tmp_path):
  f32 = train.train_and_evaluate(small_config(num_epochs=8), str(tmp_path / "f32"))
  bf16 = train.train_and_evaluate(small_config(num_epochs=8, dtype="bfloat16"), str(tmp_path / "bf16"))
  assert f32["val_acc"] > 0.9
  assert abs(bf16["val_acc"] - f32["val_acc"]) <= 0.02
  _, tree = latest_checkpoint(str(tmp_path / "bf16"))
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(tree["params"]))


def test_aace_loss_finite_where_the_authors_float16_formula_is_nan():
  logits = np.array([[30.0, 0.0, -2.0, 1.0]], np.float16)  # a confident prediction
  labels = np.array([0])
  # The authors' target in float16: p * (1 - onehot) / sum(...), and the sum underflows to 0.
  z = logits.astype(np.float16)
  p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  others = p * (1 - np.eye(4, dtype=np.float16)[labels])
  with np.errstate(invalid="ignore", divide="ignore"):
    authors_q = others / others.sum(-1, keepdims=True)
  assert np.isnan(authors_q).any()
  for dtype in (jnp.float16, jnp.bfloat16):
    loss, grad = jax.value_and_grad(lambda z: aace_jax.aace_cross_entropy(z, labels).sum())(jnp.asarray(logits, dtype))
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad, np.float32)))
    # q = softmax over the other classes: finite and summing to one.
    q = aace_jax.aace_targets(jnp.asarray(logits, dtype), labels)
    np.testing.assert_allclose(np.asarray(q).sum(), 1.0, rtol=1e-5)


def poisoned_digits(bad_records, batch_size=64):
  """The digits with NaN images at `bad_records`, built as a `Data` directly: the pipeline's own
  checks would refuse them (see `test_nonfinite_record_is_named_before_training`), and these tests
  are about what the step does when a NaN reaches it anyway."""
  data = input_pipeline.create_data("digits", global_batch=batch_size, global_eval_batch=128, seed=0)
  images = data.train.images.copy()
  images[bad_records] = np.nan
  data.train = input_pipeline.Split(images, data.train.labels)
  return data


def test_nonfinite_record_is_named_before_training(monkeypatch, tmp_path):
  train_source, eval_source = input_pipeline.digits_sources()
  train_source.images = train_source.images.copy()
  train_source.images[17, 3, 3] = np.nan
  monkeypatch.setattr(input_pipeline, "digits_sources", lambda: (train_source, eval_source))
  with pytest.raises(input_pipeline.RecordError, match="train record 17 has non-finite pixel values"):
    train.train_and_evaluate(small_config(), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_nan_batch_is_skipped_and_counted(tmp_path):
  result = train.train_and_evaluate(small_config(num_epochs=2), str(tmp_path / "run"), data=poisoned_digits([17]))
  rows = read_csv(str(tmp_path / "run"))
  # Record 17 lands in one batch per epoch: one skipped step each, training goes on.
  assert [float(r["skipped_steps"]) for r in rows] == [1.0, 1.0]
  assert result["finished"] and result["val_acc"] > 0.5
  assert all(np.isfinite(float(r["train_loss"])) for r in rows)


def test_consecutive_nonfinite_steps_stop_with_a_checkpoint(tmp_path):
  data = poisoned_digits(slice(None))  # every batch is NaN
  with pytest.raises(train.TrainingStopped, match="the last 5 steps were not finite and were skipped"):
    train.train_and_evaluate(small_config(max_consecutive_skips=5, log_every_steps=5), str(tmp_path / "run"), data=data)
  step, tree = latest_checkpoint(str(tmp_path / "run"))
  assert step == 5
  # Every step was skipped: the checkpoint holds the initial parameters, untouched.
  init_key, _ = jax.random.split(jax.random.key(42))
  model = models.create_model("small_cnn", 10)
  initial = models.init_variables(model, init_key, (8, 8, 1))["params"]
  for saved, expected in zip(jax.tree.leaves(tree["params"]), jax.tree.leaves(initial)):
    np.testing.assert_array_equal(saved, expected)


def main_command(workdir, *extra):
  return [
    sys.executable,
    str(REPO / "train" / "main.py"),
    "--workdir",
    str(workdir),
    "--config.num_epochs=3",
    "--config.batch_size=32",
    *extra,
  ]


def test_sigterm_checkpoints_and_the_resumed_run_is_bit_identical(tmp_path):
  straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  subprocess.run(main_command(straight), check=True, capture_output=True, env=env, timeout=300)

  proc = subprocess.Popen(
    main_command(interrupted), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
  )
  for line in proc.stdout:  # wait for the first epoch to finish, then stop it mid-run
    if line.startswith("epoch 1/3"):
      time.sleep(0.3)
      proc.send_signal(signal.SIGTERM)
      break
  output = proc.stdout.read()
  assert proc.wait(timeout=120) == 0
  assert "stopped by SIGTERM at step" in output
  step, _ = latest_checkpoint(str(interrupted))
  assert 0 < step < 3 * (1438 // 32)

  resumed = subprocess.run(main_command(interrupted), capture_output=True, text=True, env=env, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "finished: test accuracy" in resumed.stdout
  assert_same_checkpoint(str(straight), str(interrupted))
  assert [int(r["epoch"]) for r in read_csv(str(interrupted))] == [0, 1, 2]


def damage(workdir, step, how):
  files = sorted(p for p in (pathlib.Path(workdir) / "checkpoints" / str(step)).rglob("*") if p.is_file())
  data_files = [p for p in files if "ocdbt.process" in str(p) and p.parent.name == "d"]
  targets = data_files or files
  for path in targets:
    if how == "truncate":
      path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    else:
      raw = bytearray(path.read_bytes())
      for i in range(0, len(raw), 7):
        raw[i] ^= 0xFF
      path.write_bytes(bytes(raw))


def write_nan_into(workdir, step):
  """Rewrites checkpoint `step` whole and readable, with one NaN parameter."""
  manager = ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, "checkpoints")), item_handlers=ocp.StandardCheckpointHandler()
  )
  tree = jax.tree.map(np.array, manager.restore(step))  # writable host copies
  tree["params"]["Conv_0"]["kernel"][0, 0, 0, 0] = np.nan
  manager.delete(step)
  manager.save(step, args=ocp.args.StandardSave(tree))
  manager.wait_until_finished()
  manager.close()


@pytest.mark.parametrize("how", ["truncate", "corrupt", "nonfinite"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, how):
  reference, damaged = str(tmp_path / "reference"), str(tmp_path / "damaged")
  train.train_and_evaluate(small_config(), reference)
  train.train_and_evaluate(small_config(), damaged)
  last = 2 * (1438 // 64)
  if how == "nonfinite":
    write_nan_into(damaged, last)
  else:
    damage(damaged, last, how)
  reason = "NaN or infinite" if how == "nonfinite" else ""
  with pytest.warns(UserWarning, match=f"resumed from the checkpoint at step {last // 2}.*{reason}"):
    result = train.train_and_evaluate(small_config(), damaged)
  assert result["finished"]
  assert_same_checkpoint(reference, damaged)


def test_no_readable_checkpoint_is_an_error_not_a_silent_restart(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(small_config(num_epochs=1, checkpoint_max_to_keep=1), workdir)
  damage(workdir, 1438 // 64, "truncate")
  with pytest.raises(checkpointing.CheckpointError, match="no readable checkpoint"):
    train.train_and_evaluate(small_config(num_epochs=1, checkpoint_max_to_keep=1), workdir)


def test_overwrite_starts_a_changed_config_over(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(small_config(num_epochs=1), workdir)
  with pytest.raises(config_checks.ConfigError, match="another config"):
    train.train_and_evaluate(small_config(num_epochs=1, optimizer="sgd"), workdir)
  result = train.train_and_evaluate(small_config(num_epochs=1, optimizer="sgd", overwrite=True), workdir)
  assert result["finished"]
  assert [int(r["epoch"]) for r in read_csv(workdir)] == [0]
  assert float(read_csv(workdir)[0]["avg_perturbation"]) == 0  # the SGD run's row, not the old one


def test_gradient_accumulation_in_the_trainer_gives_the_same_run(tmp_path):
  # The linear model has no BatchNorm (whose micro-batches would normalize on their own), so 4
  # micro-batches of 16 must give the run of one batch of 64: the same weights, up to float32 sums.
  whole, accumulated = str(tmp_path / "whole"), str(tmp_path / "accumulated")
  train.train_and_evaluate(small_config(model="linear", num_epochs=1), whole)
  train.train_and_evaluate(small_config(model="linear", num_epochs=1, grad_accum_steps=4), accumulated)
  assert_same_checkpoint(whole, accumulated, rtol=1e-5, atol=1e-6)
  row_whole, row_accumulated = read_csv(whole)[0], read_csv(accumulated)[0]
  for column in ("avg_ce_loss", "avg_perturbation", "train_loss", "train_acc", "val_loss", "val_acc"):
    assert float(row_accumulated[column]) == pytest.approx(float(row_whole[column]), rel=1e-5), column
  # And the option reaches the step: with BatchNorm, 4 micro-batches normalize otherwise than one batch.
  train.train_and_evaluate(small_config(num_epochs=1), str(tmp_path / "bn_whole"))
  train.train_and_evaluate(small_config(num_epochs=1, grad_accum_steps=4), str(tmp_path / "bn_accumulated"))
  with pytest.raises(AssertionError):
    assert_same_checkpoint(str(tmp_path / "bn_whole"), str(tmp_path / "bn_accumulated"), rtol=1e-3)
  with pytest.raises(config_checks.ConfigError, match="does not split into grad_accum_steps=3"):
    train.train_and_evaluate(small_config(grad_accum_steps=3), str(tmp_path / "bad"))


def test_corrupt_record_is_named(monkeypatch, tmp_path):
  class Corrupt:
    """A record-by-record source, as tfds.data_source is, with one unreadable record."""

    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitem__(self, index):
      if index == 123:
        raise OSError("bad CRC")
      return self.source[index]

  train_source, eval_source = input_pipeline.digits_sources()
  monkeypatch.setattr(input_pipeline, "digits_sources", lambda: (Corrupt(train_source), eval_source))
  with pytest.raises(input_pipeline.RecordError, match="train record 123 cannot be read: OSError: bad CRC"):
    train.train_and_evaluate(small_config(num_epochs=1), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  # Streamed (a split too large for memory), the record is named when a batch reads it.
  streamed = input_pipeline.StreamedSplit(input_pipeline.get_spec("digits"), Corrupt(train_source), "train")
  with pytest.raises(input_pipeline.RecordError, match="train record 123 cannot be read"):
    streamed.take(np.arange(120, 130))
