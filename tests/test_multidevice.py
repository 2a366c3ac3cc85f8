"""Runs the data-parallel tests on 8 fake CPU devices, in a subprocess."""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def test_parallel_steps_on_8_cpu_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "multidevice")],
    cwd=HERE.parent,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  print(result.stdout[-5000:], result.stderr[-3000:])
  assert result.returncode == 0, result.stdout[-5000:]
  assert " passed" in result.stdout
