"""The benchmark script runs and prints the JSON object the README documents (no timing asserted)."""

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"


def test_step_time_json_report():
  result = subprocess.run(
      [sys.executable, str(SCRIPT), "--model", "small_cnn", "--batch", "8", "--steps", "2",
       "--image_size", "8", "--num_classes", "10", "--json"],
      capture_output=True, text=True, timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert {"backend", "device", "model", "batch", "params", "results"} <= set(report)
  assert set(report["results"]) == {"sgd", "sam", "aace_sam", "optax_contrib_sam"}
  assert all(seconds > 0 for seconds in report["results"].values())
  assert report["model"] == "small_cnn" and report["batch"] == 8


def test_bad_arguments_are_rejected():
  result = subprocess.run([sys.executable, str(SCRIPT), "--batch", "0"], capture_output=True, text=True)
  assert result.returncode == 2 and "--batch and --steps must be positive, got 0" in result.stderr
