"""The benchmark scripts run and print the JSON objects the README documents (no timing asserted)."""

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"


def test_step_time_json_report():
  result = subprocess.run(
    [
      sys.executable,
      str(SCRIPT),
      "--model",
      "small_cnn",
      "--batch",
      "8",
      "--steps",
      "2",
      "--image_size",
      "8",
      "--num_classes",
      "10",
      "--json",
    ],
    capture_output=True,
    text=True,
    timeout=300,
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


INPUT_SCRIPT = SCRIPT.parent / "input_pipeline.py"


def test_input_pipeline_json_report():
  result = subprocess.run(
    [sys.executable, str(INPUT_SCRIPT), "--num_train", "2048", "--batch", "64", "--epochs", "2", "--json"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for key in ("host_images_per_sec", "trainer_images_per_sec", "step_images_per_sec"):
    assert report[key] > 0, key
  expected_ms = 1000 * 64 * (1 / report["trainer_images_per_sec"] - 1 / report["step_images_per_sec"])
  assert abs(report["host_ms_per_step"] - expected_ms) < 0.01 * max(1.0, abs(expected_ms))
  assert report["model"] == "linear" and report["optimizer"] == "sgd" and report["batch"] == 64
  assert {"backend", "device", "cpu_count"} <= set(report["machine"])


def test_input_pipeline_bad_arguments_are_rejected():
  result = subprocess.run([sys.executable, str(INPUT_SCRIPT), "--epochs", "1"], capture_output=True, text=True)
  assert result.returncode == 2 and "--epochs >= 2" in result.stderr


FIRST_STEP_SCRIPT = SCRIPT.parent / "first_step.py"


def test_first_step_json_report_cold_then_cached():
  result = subprocess.run(
    [sys.executable, str(FIRST_STEP_SCRIPT), "--model", "linear", "--batch", "8", "--json"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  cold, cached = report["cold"], report["cached"]
  for phases in (cold, cached):
    assert {"init_seconds", "trace_seconds", "lower_seconds", "compile_seconds", "first_step_seconds"} <= set(phases)
  assert cold["cache_misses"] > 0 and cold["cache_hits"] == 0
  assert cached["cache_misses"] == 0 and cached["cache_hits"] == cold["cache_misses"]
  assert cached["cache_entries"] == cold["cache_entries"]  # the cached run compiled nothing new
  # The step compiled ahead, beside the init; its first call compiled nothing more.
  assert cold["first_call_compiles"] == cached["first_call_compiles"] == 0
  assert cold["ready_seconds"] <= cold["first_step_seconds"]
