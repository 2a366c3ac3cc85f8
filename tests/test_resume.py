"""Exact resume after every kind of stop: SIGKILL at each point of an epoch's end, SIGTERM, Ctrl-C, damaged checkpoints.

Kill points use real subprocesses and real signals and compare the whole
metrics.csv (every column but the timing) and the final checkpoint with an
uninterrupted run.
"""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import ARGS
from tests.helpers import ENV
from tests.helpers import REPO
from tests.helpers import STEPS_PER_EPOCH
from tests.helpers import assert_same_checkpoint
from tests.helpers import latest_checkpoint
from tests.helpers import main_command
from tests.helpers import read_csv
from tests.helpers import small_config
from tests.helpers import without_file_permission_override
from train import checkpointing
from train import config_checks
from train import epoch_row
from train import train

# Runs train/main.py in this process after arranging to kill it at KILL_POINT, for epoch 1.
DRIVER = textwrap.dedent("""
    import os, pathlib, runpy, signal, sys, time
    sys.path.insert(0, {repo!r})
    from train import checkpointing, run_files

    kill_point, checkpoints_dir = os.environ["KILL_POINT"], pathlib.Path(sys.argv[2]) / "checkpoints"

    def die():
      os.kill(os.getpid(), signal.SIGKILL)

    def finalized(step):
      return (checkpoints_dir / str(step) / "_CHECKPOINT_METADATA").exists()

    save, append = checkpointing.Checkpoints.save, run_files.RunFiles.append

    def save_then_die(self, state, totals, history):
      save(self, state, totals, history)
      if int(state.step) == 2 * {steps}:
        die()  # the asynchronous write has just begun

    def append_after_checkpoint(self, row):
      if row["epoch"] == 1:
        for _ in range(600):  # wait until the epoch's checkpoint is whole, then die before the CSV row
          if finalized(2 * {steps}):
            break
          time.sleep(0.05)
        die()
      append(self, row)

    def append_then_die(self, row):
      append(self, row)
      if row["epoch"] == 1:
        die()

    if kill_point == "during_checkpoint_write":
      checkpointing.Checkpoints.save = save_then_die
    elif kill_point == "after_checkpoint_before_csv":
      run_files.RunFiles.append = append_after_checkpoint
    elif kill_point == "after_csv_row":
      run_files.RunFiles.append = append_then_die
    sys.argv = ["train/main.py", *sys.argv[1:]]
    runpy.run_path({main!r}, run_name="__main__")
""").format(repo=str(REPO), steps=STEPS_PER_EPOCH, main=str(REPO / "train" / "main.py"))


def assert_same_csv(workdir_a, workdir_b):
  rows_a, rows_b = read_csv(workdir_a), read_csv(workdir_b)
  assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b] == ["0", "1", "2"]
  for row_a, row_b in zip(rows_a, rows_b):
    for column in epoch_row.HISTORY_COLUMNS:
      assert row_a[column] == row_b[column], (row_a["epoch"], column)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
  subprocess.run(main_command(workdir), check=True, capture_output=True, env=ENV, timeout=300)
  return str(workdir)


@pytest.mark.parametrize("kill_point", ["during_checkpoint_write", "after_checkpoint_before_csv", "after_csv_row"])
def test_sigkill_at_any_point_of_an_epoch_end_loses_nothing(tmp_path, uninterrupted, kill_point):
  workdir = tmp_path / "run"
  killed = subprocess.run(
    [sys.executable, "-c", DRIVER, "--workdir", str(workdir), *ARGS],
    capture_output=True,
    text=True,
    env=dict(ENV, KILL_POINT=kill_point),
    timeout=300,
  )
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  if kill_point == "after_checkpoint_before_csv":
    assert [r["epoch"] for r in read_csv(workdir)] == ["0"]  # the defect: the row was lost for good
    assert latest_checkpoint(str(workdir))[0] == 2 * STEPS_PER_EPOCH
  resumed = subprocess.run(main_command(workdir), capture_output=True, text=True, env=ENV, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "finished: test accuracy" in resumed.stdout
  assert_same_csv(uninterrupted, str(workdir))
  assert_same_checkpoint(uninterrupted, str(workdir))
  assert not (workdir / "lock").exists()


def test_sigterm_mid_epoch_checkpoints_and_the_resumed_run_is_the_uninterrupted_one(tmp_path, uninterrupted):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(main_command(workdir), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
  for line in proc.stdout:  # stop it early in the second epoch (it stops after the step in flight)
    if line.startswith("epoch 1/3"):
      proc.send_signal(signal.SIGTERM)
      break
  output = proc.stdout.read()
  assert proc.wait(timeout=120) == 0
  assert "stopped by SIGTERM at step" in output
  step, _ = latest_checkpoint(str(workdir))
  assert STEPS_PER_EPOCH < step < 2 * STEPS_PER_EPOCH
  resumed = subprocess.run(main_command(workdir), capture_output=True, text=True, env=ENV, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "finished: test accuracy" in resumed.stdout
  assert_same_csv(uninterrupted, str(workdir))  # epoch 1's row too, half of it trained before the stop
  assert_same_checkpoint(uninterrupted, str(workdir))


def test_sigterm_during_startup_stops_after_the_first_step_with_a_checkpoint(monkeypatch, tmp_path):
  create = train.create_experiment

  def signalled_while_starting(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return create(*args, **kwargs)

  monkeypatch.setattr(train, "create_experiment", signalled_while_starting)
  result = train.train_and_evaluate(small_config(), str(tmp_path / "run"))
  assert result["stopped_by"] == "SIGTERM" and result["step"] == 1
  assert latest_checkpoint(str(tmp_path / "run"))[0] == 1


def assert_same_history_rows(reference, workdir, epochs):
  """`workdir`'s metrics.csv holds the rows of `epochs`, equal to `reference`'s but for the timing."""
  rows, expected = read_csv(workdir), read_csv(reference)[: len(epochs)]
  assert [r["epoch"] for r in rows] == [r["epoch"] for r in expected] == [str(e) for e in epochs]
  for row, expected_row in zip(rows, expected):
    for column in epoch_row.HISTORY_COLUMNS:
      assert row[column] == expected_row[column], (row["epoch"], column)


@pytest.mark.parametrize("stop_after_epoch", [0, 1])  # the first epoch, and the last
def test_a_stop_at_an_epochs_last_step_evaluates_the_epoch_first(monkeypatch, tmp_path, stop_after_epoch):
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  config = small_config(num_epochs=2)
  stop_step = (stop_after_epoch + 1) * train.train_and_evaluate(config, straight)["step"] // 2
  monkeypatch.setattr(
    train.StopSignals, "stop_reason", lambda self, step, at_log_point: "SIGTERM" if step == stop_step else None
  )
  result = train.train_and_evaluate(config, stopped)
  assert result["stopped_by"] == "SIGTERM" and result["step"] == stop_step
  assert result["finished"] == (stop_after_epoch == 1)
  assert_same_history_rows(straight, stopped, range(stop_after_epoch + 1))  # the stopped epoch's row too
  assert latest_checkpoint(stopped)[0] == stop_step
  monkeypatch.undo()
  assert train.train_and_evaluate(config, stopped)["finished"]
  assert_same_history_rows(straight, stopped, range(2))
  assert_same_checkpoint(straight, stopped)


def test_a_checkpoint_at_an_epochs_end_without_its_row_is_evaluated_on_resume(monkeypatch, tmp_path):
  """As a stop for non-finite steps at an epoch's last step leaves it (and a stop at any last step did before
  the stop evaluated the epoch): the resumed run evaluates that epoch, then trains on."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  config = small_config(num_epochs=2)
  train.train_and_evaluate(config, straight)
  monkeypatch.setattr(train.checkpointing, "with_row", lambda history, row: history)  # rows kept out of checkpoints
  train.train_and_evaluate(small_config(num_epochs=2, halt_after_epochs=1), resumed)
  monkeypatch.undo()
  os.remove(os.path.join(resumed, "metrics.csv"))  # the rows come from the checkpoint, which has none
  assert train.train_and_evaluate(config, resumed)["finished"]
  rows = read_csv(resumed)
  assert rows[0]["images_per_sec"] == "nan"  # evaluated only: no step timed
  assert_same_history_rows(straight, resumed, range(2))
  assert_same_checkpoint(straight, resumed)


def test_ctrl_c_pressed_again_while_the_checkpoint_is_written_still_exits_cleanly(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
    main_command(workdir, "--config.num_epochs=30"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
  )
  for line in proc.stdout:
    if line.startswith("epoch 1/30"):
      break
  for _ in range(5):  # an impatient user, still pressing while the process shuts down
    proc.send_signal(signal.SIGINT)
    time.sleep(0.4)
  output, errors = proc.communicate(timeout=120)
  assert proc.returncode == 0, errors[-3000:]
  assert "stopped by SIGINT at step" in output and "checkpoint written" in output
  assert "Traceback" not in errors and "KeyboardInterrupt" not in errors
  step, _ = latest_checkpoint(str(workdir))
  assert step > 0


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
    train.train_and_evaluate(small_config(num_epochs=1, method="sgd"), workdir)
  result = train.train_and_evaluate(small_config(num_epochs=1, method="sgd", overwrite=True), workdir)
  assert result["finished"]
  assert [int(r["epoch"]) for r in read_csv(workdir)] == [0]
  assert float(read_csv(workdir)[0]["avg_perturbation"]) == 0  # the SGD run's row, not the old one


def bom(text):
  return "\ufeff" + text


@pytest.mark.parametrize(
  "edit, keeps_timing, set_aside",
  [
    (lambda text: bom(text), True, False),  # saved again by a spreadsheet
    (lambda text: text.replace(",", ";"), True, False),  # another delimiter
    (lambda text: "\n".join(line.split(",", 1)[1] for line in text.splitlines()), False, True),  # no epoch column
    (lambda text: "\n".join(text.splitlines()[1:]), False, True),  # no header
    (lambda text: b"\x00\xff\xfe junk\x80", False, True),  # binary junk
  ],
)
def test_a_metrics_csv_edited_by_hand_does_not_block_the_resume(tmp_path, edit, keeps_timing, set_aside):
  workdir = tmp_path / "run"
  train.train_and_evaluate(small_config(halt_after_epochs=1), str(workdir))
  csv_path = workdir / "metrics.csv"
  original = read_csv(workdir)
  edited = edit(csv_path.read_text())
  csv_path.write_bytes(edited if isinstance(edited, bytes) else edited.encode())
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = train.train_and_evaluate(small_config(), str(workdir))
  assert result["finished"]
  rows = read_csv(workdir)
  assert [r["epoch"] for r in rows] == ["0", "1"]
  for column in epoch_row.HISTORY_COLUMNS:
    assert float(rows[0][column]) == pytest.approx(float(original[0][column]), rel=1e-6, nan_ok=True), column
  assert (rows[0]["wall_time"] == original[0]["wall_time"]) == keeps_timing
  kept = list(workdir.glob("metrics.csv.unreadable-*"))
  assert len(kept) == set_aside
  assert any("cannot be read" in str(w.message) for w in caught) == set_aside


@pytest.mark.parametrize("unreadable", ["step_folder", "file_inside"])
def test_a_checkpoint_unreadable_for_its_permissions_is_kept_and_named(tmp_path, unreadable):
  workdir = tmp_path / "run"
  train.train_and_evaluate(small_config(num_epochs=3, halt_after_epochs=2), str(workdir))
  newest = max((workdir / "checkpoints").iterdir(), key=lambda p: int(p.name))
  target = newest if unreadable == "step_folder" else newest / "default" / "_METADATA"
  target.chmod(0)
  try:
    command = [sys.executable, str(REPO / "train" / "main.py"), "--workdir", str(workdir)]
    command += ["--config.num_epochs=3", "--config.batch_size=64", "--config.eval_batch_size=128"]
    command += ["--config.log_every_steps=5", "--config.compilation_cache=False"]
    result = subprocess.run(without_file_permission_override(command), capture_output=True, text=True, env=ENV)
  finally:
    target.chmod(0o755 if target.is_dir() else 0o644)
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == (
    f"error: the checkpoint of step {newest.name} cannot be read: permission denied on {target}. It is kept,"
    " and so is every other; fix the permissions and rerun."
  )
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["22", "44"]
  assert [int(r["epoch"]) for r in read_csv(workdir)] == [0, 1]


def test_a_checkpoint_written_before_the_validation_columns_resumes(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(small_config(), straight)
  train.train_and_evaluate(small_config(halt_after_epochs=1), resumed)
  # The halted run's checkpoint as a trainer without holdout_* columns wrote it: its history one column pair short.
  manager = ocp.CheckpointManager(
    os.path.abspath(os.path.join(resumed, "checkpoints")), item_handlers=ocp.StandardCheckpointHandler()
  )
  step, tree = latest_checkpoint(resumed)
  keep = [i for i, column in enumerate(epoch_row.HISTORY_COLUMNS) if not column.startswith("holdout_")]
  tree["history"] = tree["history"][:, keep]
  manager.delete(step)
  manager.save(step, args=ocp.args.StandardSave(tree))
  manager.wait_until_finished()
  manager.close()
  train.train_and_evaluate(small_config(), resumed)
  assert_same_checkpoint(straight, resumed)
  assert [row["val_acc"] for row in read_csv(straight)] == [row["val_acc"] for row in read_csv(resumed)]
