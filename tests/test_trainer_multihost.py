"""The trainer as 2 processes x 1 CPU device (jax.distributed, gloo) equals 1 process x 2 devices."""

import os
import pathlib
import signal
import subprocess
import sys

from tests.helpers import assert_same_checkpoint
from tests.helpers import free_port
from tests.helpers import latest_checkpoint
from tests.helpers import read_csv

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = [
  "--config.num_epochs=1",
  "--config.batch_size=64",
  "--config.eval_batch_size=128",
  "--config.compilation_cache=False",
]


def launch(args, devices):
  env = dict(
    os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1"
  )
  return subprocess.Popen(
    [sys.executable, str(REPO / "train" / "main.py"), *CONFIG, *args],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
    cwd=REPO,
  )


def finish(procs):
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in outputs]


def processes_of_one_run(workdir, *args, count: int = 2) -> list:
  """`count` processes of one CPU device each, one run over jax.distributed (gloo) with a coordinator on loopback."""
  port = free_port()
  multihost = ["--multihost", f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}"]
  return [launch(["--workdir", str(workdir), *args, *multihost, f"--process_id={i}"], devices=1) for i in range(count)]


def test_two_processes_train_like_one(tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  finish([launch(["--workdir", str(single)], devices=2)])
  outputs = finish(processes_of_one_run(multi))
  assert "finished: test accuracy" in outputs[0]
  assert "finished" not in outputs[1]  # only process 0 reports and writes
  assert len(read_csv(str(multi))) == 1
  assert_same_checkpoint(str(single), str(multi), rtol=1e-5, atol=1e-6)
  rows_a, rows_b = read_csv(str(single)), read_csv(str(multi))
  assert float(rows_a[0]["val_acc"]) == float(rows_b[0]["val_acc"])


def test_sigterm_on_one_host_stops_every_host_at_the_same_step_and_resumes(tmp_path):
  """JAX's preemption service: SIGTERM to process 1 alone; both stop at one step, checkpoint, and resume."""
  straight, preempted = tmp_path / "straight", tmp_path / "preempted"

  finish(processes_of_one_run(straight, "--config.num_epochs=2"))
  procs = processes_of_one_run(preempted, "--config.num_epochs=2")
  for line in procs[0].stdout:
    if line.startswith("first step"):
      procs[1].send_signal(signal.SIGTERM)
      break
  outputs = finish(procs)
  assert "stopped by SIGTERM at step" in outputs[0], outputs[0][-2000:]
  step = int(outputs[0].split("stopped by SIGTERM at step ")[1].split(",")[0])
  assert 0 < step < 2 * (1438 // 64)
  assert latest_checkpoint(str(preempted))[0] == step  # written by both processes, at the agreed step
  resumed = finish(processes_of_one_run(preempted, "--config.num_epochs=2"))
  assert "finished: test accuracy" in resumed[0]
  assert_same_checkpoint(str(straight), str(preempted))
  assert [r["val_acc"] for r in read_csv(str(straight))] == [r["val_acc"] for r in read_csv(str(preempted))]


def test_a_run_resumes_on_another_device_count_and_process_count(tmp_path):
  """4 devices, then 2, then 1 (and 2 processes, then 1): the same epochs, steps and rows as one device.

  A linear model has no BatchNorm, whose statistics are per device: what differs between device counts is then
  only the order of the reductions, and the run ends where one device's ends to float32 rounding.
  """
  linear = ["--config.model=linear", "--config.num_epochs=3", "--config.halt_after_epochs=1"]
  straight, resized, processes = tmp_path / "straight", tmp_path / "resized", tmp_path / "processes"
  finish([launch(["--workdir", str(straight), *linear, "--config.halt_after_epochs=3"], devices=1)])
  for devices in (4, 2, 1):
    finish([launch(["--workdir", str(resized), *linear], devices=devices)])
  finish(processes_of_one_run(processes, *linear))
  finish([launch(["--workdir", str(processes), *linear, "--config.halt_after_epochs=2"], devices=1)])
  for workdir in (resized, processes):
    rows = read_csv(str(workdir))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]  # no row lost or doubled
    assert latest_checkpoint(str(workdir))[0] == 3 * (1438 // 64)
    assert_same_checkpoint(str(straight), str(workdir), rtol=1e-4, atol=1e-6)
    for row, expected in zip(rows, read_csv(str(straight))):
      assert abs(float(row["val_acc"]) - float(expected["val_acc"])) <= 1 / 359  # one test image of 359
  # A device count that does not divide the batch: one line, before anything is restored or written.
  before = sorted(path.name for path in (resized / "checkpoints").iterdir())
  result = launch(["--workdir", str(resized), *linear], devices=3)
  _, errors = result.communicate(timeout=300)
  assert result.returncode == 1
  assert errors.strip().splitlines()[-1] == "error: Bad config: batch_size 64 is not divisible by the 3 devices."
  assert sorted(path.name for path in (resized / "checkpoints").iterdir()) == before
