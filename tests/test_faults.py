"""What a run does when something outside it fails: a shared workdir, bad values, a full or read-only disk, NaN data.

Each fault ends in one line naming it (before anything is written when it
can be found then), or is survived with a warning; none loses a checkpoint.
"""

import os
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import ENV
from tests.helpers import REPO
from tests.helpers import latest_checkpoint
from tests.helpers import main_command
from tests.helpers import read_csv
from tests.helpers import small_config
from tests.helpers import without_file_permission_override
from train import checkpointing
from train import input_pipeline
from train import models
from train import run_files
from train import train

CONTEND = textwrap.dedent("""
  import os, sys, time
  sys.path.insert(0, {repo!r})
  from train import run_files
  root, trials = sys.argv[1], int(sys.argv[2])
  def wait_for(path):
    while not os.path.exists(path):
      time.sleep(0.0005)
  for trial in range(trials):  # one process per contender for every trial: jax is imported once
    lock = run_files.WorkdirLock(os.path.join(root, str(trial)))
    wait_for(os.path.join(root, f"go{{trial}}"))  # released together
    try:
      lock.acquire()
    except run_files.WorkdirBusy:
      print("busy", flush=True)
    except Exception as error:
      print(type(error).__name__, error, flush=True)
    else:
      print("held", flush=True)
      wait_for(os.path.join(root, f"release{{trial}}"))  # held until every other contender has tried
      lock.release()
      print("released", flush=True)
""").format(repo=str(REPO))


def test_a_second_run_on_a_held_workdir_is_refused_and_a_stale_lock_is_taken(tmp_path):
  workdir = tmp_path / "run"
  long_run = main_command(workdir, "--config.num_epochs=30")  # long enough for a second run to start meanwhile
  first = subprocess.Popen(long_run, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
  for line in first.stdout:
    if line.startswith("first step"):
      break
  second = subprocess.run(long_run, capture_output=True, text=True, env=ENV, timeout=120)
  assert first.poll() is None, "the first run ended before the second tried the workdir"
  holder = (workdir / "lock").read_text()
  first.stdout.read()
  assert first.wait(timeout=300) == 0
  assert second.returncode != 0
  assert second.stderr.strip().splitlines()[-1].startswith(f"error: {workdir} is in use by pid {first.pid} on host")
  assert f'"pid": {first.pid}' in holder
  assert [int(r["epoch"]) for r in read_csv(workdir)] == list(range(30))  # each written once, by the first run
  assert not (workdir / "lock").exists()

  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (workdir / "lock").write_text(f'{{"host": "{os.uname().nodename}", "pid": {dead.pid}}}')
  again = train.train_and_evaluate(small_config(num_epochs=1, overwrite=True), str(workdir))
  assert again["finished"] and not (workdir / "lock").exists()


def test_simultaneous_takeovers_of_a_stale_lock_leave_exactly_one_holder(tmp_path):
  contenders, trials = 8, 20
  for trial in range(trials):
    (tmp_path / str(trial)).mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / str(trial) / "lock").write_text(f'{{"host": "{os.uname().nodename}", "pid": {dead.pid}}}')
  processes = [
    subprocess.Popen([sys.executable, "-c", CONTEND, str(tmp_path), str(trials)], stdout=subprocess.PIPE, text=True)
    for _ in range(contenders)
  ]
  try:
    for trial in range(trials):
      (tmp_path / f"go{trial}").touch()
      outcomes = [process.stdout.readline().strip() for process in processes]
      assert sorted(outcomes) == ["busy"] * (contenders - 1) + ["held"], (trial, outcomes)
      (tmp_path / f"release{trial}").touch()
      assert processes[outcomes.index("held")].stdout.readline().strip() == "released"
      assert not (tmp_path / str(trial) / "lock").exists()
  finally:
    for process in processes:
      process.kill()
      process.wait()


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--config.log_every_steps=0", "log_every_steps must be >= 1, got 0"),
    ("--config.eval_batch_size=0", "eval_batch_size must be >= 1, got 0"),
    ("--config.checkpoint_max_to_keep=0", "checkpoint_max_to_keep must be >= 1, got 0"),
    ("--config.halt_after_epochs=0", "halt_after_epochs must be >= 1 (or None), got 0"),
    ("--config.learning_rate=inf", "learning_rate must be a finite number > 0, got inf"),
    ("--config.weight_decay=nan", "weight_decay must be a finite number >= 0, got nan"),
    ("--config.momentum=nan", "momentum must lie in [0, 1), got nan"),
    ("--config.num_epoch=3", 'Did you mean "num_epochs" instead of "num_epoch"?'),
    ("--config.seed=-1", "seed must be an integer in [0, 2**63 - 1], got -1"),
    ("--config.seed=18446744073709551616", "seed must be an integer in [0, 2**63 - 1], got 18446744073709551616"),
    ("--config.num_epochs=2147483648", "num_epochs must be at most 2147483647 (2**31 - 1), got 2147483648"),
  ],
)
def test_bad_values_fail_in_one_line_before_anything_is_written(tmp_path, flag, message):
  workdir = tmp_path / "run"
  result = subprocess.run(main_command(workdir, flag), capture_output=True, text=True, env=ENV, timeout=120)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr[-2000:]
  assert not workdir.exists()


@pytest.mark.parametrize(
  "source, message",
  [
    ("def get_config():\n  raise RuntimeError('no such recipe')\n", "{path}, line 2: RuntimeError: no such recipe"),
    ("def get_config(:\n  pass\n", "{path}, line 1: SyntaxError: invalid syntax"),
    ("import no_such_module\n", "{path}, line 1: ModuleNotFoundError: No module named 'no_such_module'"),
    (
      "from train.configs import default\n\ndef get_config():\n  config = default.get_config()\n"
      "  del config['compilation_cache'], config['seed']\n  return config\n",
      "Bad config: it lacks the fields compilation_cache, seed; a config starts from train/configs/default.py",
    ),
    (None, "{path} does not exist"),
  ],
)
def test_a_config_file_that_fails_is_one_line_naming_it(tmp_path, source, message):
  path = tmp_path / "my_config.py"
  if source is not None:
    path.write_text(source)
  workdir = tmp_path / "run"
  command = [sys.executable, str(REPO / "train" / "main.py"), "--config", str(path), "--workdir", str(workdir)]
  result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120, cwd=REPO)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
  expected = message.format(path=f"config file {path}")
  assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
  assert not workdir.exists()


def test_workdir_that_cannot_be_made_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  result = subprocess.run(main_command(blocker / "run"), capture_output=True, text=True, env=ENV, timeout=120)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and str(blocker) in lines[0], result.stderr[-2000:]


def test_nonfinite_record_is_named_before_training(monkeypatch, tmp_path):
  train_source, eval_source = input_pipeline.digits_sources()
  train_source.images = train_source.images.copy()
  train_source.images[17, 3, 3] = np.nan
  monkeypatch.setattr(input_pipeline, "digits_sources", lambda: (train_source, eval_source))
  with pytest.raises(input_pipeline.RecordError, match="train record 17 has non-finite pixel values"):
    train.train_and_evaluate(small_config(), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def poisoned_digits(bad_records, batch_size=64):
  """The digits with NaN images at `bad_records`, built as a `Data` directly: the pipeline's own
  checks would refuse them (see `test_nonfinite_record_is_named_before_training`), and these tests
  are about what the step does when a NaN reaches it anyway."""
  data = input_pipeline.create_data("digits", global_batch=batch_size, global_eval_batch=128, seed=0)
  images = data.train.images.copy()
  images[bad_records] = np.nan
  data.train = input_pipeline.Split(images, data.train.labels)
  return data


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


def test_losing_plots_and_events_is_a_warning(monkeypatch, tmp_path):
  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(run_files.RunFiles, "plot", full_disk)
  monkeypatch.setattr(run_files.RunFiles, "write_events", full_disk)
  with pytest.warns(UserWarning, match=r"could not write the plots \(\[Errno 28\] No space left on device\)"):
    result = train.train_and_evaluate(small_config(num_epochs=1), str(tmp_path / "run"))
  assert result["finished"] and len(read_csv(str(tmp_path / "run"))) == 1


def test_failed_checkpoint_write_says_what_was_saved_last(monkeypatch, tmp_path):
  save = ocp.CheckpointManager.save

  def fails_after_the_first(self, step, *args, **kwargs):
    if step > 1438 // 64:
      raise OSError(28, "No space left on device")
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", fails_after_the_first)
  with pytest.raises(
    checkpointing.CheckpointError,
    match=(
      r"writing a checkpoint \(at step 44 or before\) in .* failed \(OSError: \[Errno 28\] No space left on device\);"
      r" the last checkpoint written whole is step 22\."
    ),
  ):
    train.train_and_evaluate(small_config(), str(tmp_path / "run"))
  assert not (tmp_path / "run" / "lock").exists()


def run_then_break_a_write(workdir, break_it) -> tuple[int, list, str]:
  """Starts a 40-epoch run without root's permission override, calls `break_it()` after its first epoch, and
  returns its exit status, its stderr lines (progress bars left out) and its stderr; fails if it hangs."""
  command = [*main_command(workdir), "--config.num_epochs=40"]
  proc = subprocess.Popen(
    without_file_permission_override(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
  )
  for line in proc.stdout:
    if line.startswith("epoch 2/40"):
      break
  break_it()
  try:
    _, errors = proc.communicate(timeout=120)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail("the run hung after the failed write")
  lines = [line for line in errors.replace("\r", "\n").splitlines() if line.strip() and "it/s" not in line]
  return proc.returncode, lines, errors


def test_a_workdir_made_read_only_mid_run_is_one_short_error_and_no_hang(tmp_path):
  workdir = tmp_path / "run"

  def read_only():
    for folder, subfolders, _ in os.walk(workdir):
      for name in subfolders:
        os.chmod(os.path.join(folder, name), 0o555)
    workdir.chmod(0o555)

  try:
    returncode, lines, errors = run_then_break_a_write(workdir, read_only)
  finally:
    for folder, _, _ in os.walk(workdir):
      os.chmod(folder, 0o755)
  assert returncode == 1
  assert "Traceback" not in errors and len(lines) <= 3, lines[:20]
  assert lines[-1].startswith("error: writing a checkpoint (at step"), lines[-1]
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert lines[-1].endswith(f"the last checkpoint written whole is step {saved[-1]}."), lines[-1]


def test_only_the_closed_event_loop_reports_of_abandoned_writes_are_dropped(tmp_path, monkeypatch):
  reported = []
  monkeypatch.setattr(sys, "unraisablehook", reported.append)
  checkpointing.Checkpoints(str(tmp_path / "checkpoints"), max_to_keep=2).close()
  closed_loop = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(exc_value=RuntimeError("a callback failed"))
  sys.unraisablehook(closed_loop)
  sys.unraisablehook(other)
  assert reported == [other]


def test_a_metrics_csv_that_cannot_be_written_is_one_line_naming_it_and_the_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  returncode, lines, errors = run_then_break_a_write(workdir, lambda: (workdir / "metrics.csv").chmod(0o444))
  assert returncode == 1 and "Traceback" not in errors and len(lines) <= 3, lines[:20]
  saved = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert lines[-1] == (
    f"error: could not write {workdir / 'metrics.csv'} (Permission denied); the checkpoint of step {saved},"
    " written whole, holds its rows: rerun to rebuild it."
  )
