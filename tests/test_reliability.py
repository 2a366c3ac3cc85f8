"""Every kill point, non-finite state, workdir sharing, bad values and filesystem errors.

Kill points use real subprocesses and real signals (SIGKILL, SIGTERM) and compare
the whole metrics.csv (every column but the timing) and the final checkpoint
with an uninterrupted run.
"""

import csv
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import orbax.checkpoint as ocp
import pytest

from tests.helpers import assert_same_checkpoint
from tests.helpers import latest_checkpoint
from tests.helpers import small_config
from train import checkpointing
from train import input_pipeline
from train import run_files
from train import train

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 1438 // 32
ARGS = ["--config.num_epochs=3", "--config.batch_size=32", "--config.compilation_cache=False"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1")

# Runs train/main.py in this process after arranging to kill it at KILL_POINT, for epoch 1.
DRIVER = textwrap.dedent("""
    import os, pathlib, runpy, signal, sys, time
    sys.path.insert(0, {repo!r})
    from train import checkpointing, workdir

    kill_point, checkpoints_dir = os.environ["KILL_POINT"], pathlib.Path(sys.argv[2]) / "checkpoints"

    def die():
      os.kill(os.getpid(), signal.SIGKILL)

    def finalized(step):
      return (checkpoints_dir / str(step) / "_CHECKPOINT_METADATA").exists()

    save, append = checkpointing.Checkpoints.save, workdir.RunFiles.append

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
      workdir.RunFiles.append = append_after_checkpoint
    elif kill_point == "after_csv_row":
      workdir.RunFiles.append = append_then_die
    sys.argv = ["train/main.py", *sys.argv[1:]]
    runpy.run_path({main!r}, run_name="__main__")
""").format(repo=str(REPO), steps=STEPS_PER_EPOCH, main=str(REPO / "train" / "main.py"))


def main_command(workdir, *extra):
  return [sys.executable, str(REPO / "train" / "main.py"), "--workdir", str(workdir), *ARGS, *extra]


def read_rows(workdir):
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    return list(csv.DictReader(f))


def assert_same_csv(workdir_a, workdir_b):
  rows_a, rows_b = read_rows(workdir_a), read_rows(workdir_b)
  assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b] == ["0", "1", "2"]
  for row_a, row_b in zip(rows_a, rows_b):
    for column in checkpointing.HISTORY_COLUMNS:
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
    assert [r["epoch"] for r in read_rows(workdir)] == ["0"]  # the defect: the row was lost for good
    assert latest_checkpoint(str(workdir))[0] == 2 * STEPS_PER_EPOCH
  resumed = subprocess.run(main_command(workdir), capture_output=True, text=True, env=ENV, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "finished: test accuracy" in resumed.stdout
  assert_same_csv(uninterrupted, str(workdir))
  assert_same_checkpoint(uninterrupted, str(workdir))
  assert not (workdir / "lock").exists()


def test_sigterm_mid_epoch_gives_the_uninterrupted_rows(tmp_path, uninterrupted):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(main_command(workdir), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
  for line in proc.stdout:  # stop it early in the second epoch (it stops after the step in flight)
    if line.startswith("epoch 1/3"):
      proc.send_signal(signal.SIGTERM)
      break
  assert proc.wait(timeout=120) == 0
  step, _ = latest_checkpoint(str(workdir))
  assert STEPS_PER_EPOCH < step < 2 * STEPS_PER_EPOCH
  resumed = subprocess.run(main_command(workdir), capture_output=True, text=True, env=ENV, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert_same_csv(uninterrupted, str(workdir))  # epoch 1's row too, half of it trained before the stop
  assert_same_checkpoint(uninterrupted, str(workdir))


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
  assert [int(r["epoch"]) for r in read_rows(workdir)] == list(range(30))  # each written once, by the first run
  assert not (workdir / "lock").exists()

  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (workdir / "lock").write_text(f'{{"host": "{os.uname().nodename}", "pid": {dead.pid}}}')
  again = train.train_and_evaluate(small_config(num_epochs=1, overwrite=True), str(workdir))
  assert again["finished"] and not (workdir / "lock").exists()


CONTEND = textwrap.dedent("""
  import os, sys, time
  sys.path.insert(0, {repo!r})
  from train import run_files
  workdir_path, go = sys.argv[1], sys.argv[2]
  lock = run_files.WorkdirLock(workdir_path)
  while not os.path.exists(go):  # released together
    time.sleep(0.0005)
  try:
    lock.acquire()
  except workdir.WorkdirBusy:
    print("busy")
  except Exception as error:
    print(type(error).__name__, error)
  else:
    print("held", flush=True)
    time.sleep(0.3)  # held while the others try
    lock.release()
""").format(repo=str(REPO))


def test_simultaneous_takeovers_of_a_stale_lock_leave_exactly_one_holder(tmp_path):
  contenders = 8
  for trial in range(20):
    workdir = tmp_path / str(trial)
    workdir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (workdir / "lock").write_text(f'{{"host": "{os.uname().nodename}", "pid": {dead.pid}}}')
    go = tmp_path / f"go{trial}"
    processes = [
      subprocess.Popen([sys.executable, "-c", CONTEND, str(workdir), str(go)], stdout=subprocess.PIPE, text=True)
      for _ in range(contenders)
    ]
    time.sleep(0.5)  # every contender waiting
    go.touch()
    outcomes = sorted(process.communicate(timeout=60)[0].strip() for process in processes)
    assert outcomes == ["busy"] * (contenders - 1) + ["held"], (trial, outcomes)
    assert not (workdir / "lock").exists()


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


@pytest.mark.parametrize("empty", ["train", "eval"])
def test_empty_split_is_named_before_anything_is_written(monkeypatch, tmp_path, empty):
  sources = dict(zip(("train", "eval"), input_pipeline.digits_sources()))
  sources[empty] = input_pipeline.ArraySource(sources[empty].images[:0], sources[empty].labels[:0])
  monkeypatch.setattr(input_pipeline, "digits_sources", lambda: (sources["train"], sources["eval"]))
  with pytest.raises(input_pipeline.RecordError, match=f"the {empty} split of 'digits' is empty"):
    train.train_and_evaluate(small_config(), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_huge_pixel_is_named_instead_of_poisoning_the_statistics(monkeypatch, tmp_path):
  train_source, eval_source = input_pipeline.digits_sources()
  train_source.images = train_source.images.copy()
  train_source.images[40, 2, 2] = 3e19
  monkeypatch.setattr(input_pipeline, "digits_sources", lambda: (train_source, eval_source))
  with pytest.raises(input_pipeline.RecordError, match=r"train record 40 has pixel values in \[0, 3e\+19\]"):
    train.train_and_evaluate(small_config(), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_workdir_that_cannot_be_made_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  result = subprocess.run(main_command(blocker / "run"), capture_output=True, text=True, env=ENV, timeout=120)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and str(blocker) in lines[0], result.stderr[-2000:]


def test_losing_plots_and_events_is_a_warning(monkeypatch, tmp_path):
  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(run_files.RunFiles, "plot", full_disk)
  monkeypatch.setattr(run_files.RunFiles, "_add_scalars", full_disk)
  with pytest.warns(UserWarning, match=r"could not write the plots \(\[Errno 28\] No space left on device\)"):
    result = train.train_and_evaluate(small_config(num_epochs=1), str(tmp_path / "run"))
  assert result["finished"] and len(read_rows(str(tmp_path / "run"))) == 1


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
  rows, expected = read_rows(workdir), read_rows(reference)[: len(epochs)]
  assert [r["epoch"] for r in rows] == [r["epoch"] for r in expected] == [str(e) for e in epochs]
  for row, expected_row in zip(rows, expected):
    for column in checkpointing.HISTORY_COLUMNS:
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
  rows = read_rows(resumed)
  assert rows[0]["images_per_sec"] == "nan"  # evaluated only: no step timed
  assert_same_history_rows(straight, resumed, range(2))
  assert_same_checkpoint(straight, resumed)


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
  original = read_rows(workdir)
  edited = edit(csv_path.read_text())
  csv_path.write_bytes(edited if isinstance(edited, bytes) else edited.encode())
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = train.train_and_evaluate(small_config(), str(workdir))
  assert result["finished"]
  rows = read_rows(workdir)
  assert [r["epoch"] for r in rows] == ["0", "1"]
  for column in checkpointing.HISTORY_COLUMNS:
    assert float(rows[0][column]) == pytest.approx(float(original[0][column]), rel=1e-6, nan_ok=True), column
  assert (rows[0]["wall_time"] == original[0]["wall_time"]) == keeps_timing
  kept = list(workdir.glob("metrics.csv.unreadable-*"))
  assert len(kept) == set_aside
  assert any("cannot be read" in str(w.message) for w in caught) == set_aside


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


def without_file_permission_override(command: list) -> list:
  """`command` run as this user without the capabilities that let root read any file (CI runs as root),
  or a skip where they cannot be dropped."""
  if os.geteuid() != 0:
    return command
  if shutil.which("capsh") is None:
    pytest.skip("needs capsh (libcap2-bin) to drop root's file-permission override")
  shell = " ".join(shlex.quote(str(part)) for part in command)
  return ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shell]


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
  assert [int(r["epoch"]) for r in read_rows(workdir)] == [0, 1]


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


def test_a_metrics_csv_that_cannot_be_written_is_one_line_naming_it_and_the_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  returncode, lines, errors = run_then_break_a_write(workdir, lambda: (workdir / "metrics.csv").chmod(0o444))
  assert returncode == 1 and "Traceback" not in errors and len(lines) <= 3, lines[:20]
  saved = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert lines[-1] == (
    f"error: could not write {workdir / 'metrics.csv'} (Permission denied); the checkpoint of step {saved},"
    " written whole, holds its rows: rerun to rebuild it."
  )
