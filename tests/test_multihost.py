"""2 processes x 4 CPU devices (jax.distributed over 127.0.0.1, gloo) equal 1 process x 8 devices."""

import pathlib
import subprocess
import sys

import numpy as np

from tests.helpers import free_port

WORKER = pathlib.Path(__file__).resolve().parent / "multihost_worker.py"


def run_processes(num_processes, out):
  port = str(free_port())
  procs = [
    subprocess.Popen(
      [sys.executable, str(WORKER), str(i), str(num_processes), port, str(out)],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(num_processes)
  ]
  try:
    outputs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, output in zip(procs, outputs):
    assert p.returncode == 0, output[-3000:]
  return np.load(out)


def test_two_hosts_equal_one_host(tmp_path):
  one = run_processes(1, tmp_path / "one.npz")
  two = run_processes(2, tmp_path / "two.npz")
  assert set(one.files) == set(two.files) == {"loss", "w1", "b1", "w2", "b2"}
  for name in one.files:
    np.testing.assert_allclose(two[name], one[name], rtol=1e-6, atol=1e-7, err_msg=name)
