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
      "8",
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
  assert set(report["results"]) == {
    "sgd",
    "sam",
    "aace_sam",
    "optax_contrib_sam",
    "aace_sam_k2",
    "aace_sam_k4",
    "aace_sam_k8",
    "aace_sam_f0.25",
    "aace_sam_f0.5",
  }
  assert all(seconds > 0 for seconds in report["results"].values())
  assert report["model"] == "small_cnn" and report["batch"] == 8


def test_a_cheaper_steps_time_is_the_mean_of_its_cycles():
  sys.path.insert(0, str(SCRIPT.parent))
  import step_time

  # A full step of 3 s and three reuse steps of 1 s: 1.5 s a step, whatever step the rounds start on.
  assert step_time.per_step_seconds([1, 1, 3, 1, 1, 1, 3, 1], 4) == 1.5
  assert step_time.per_step_seconds([2.0, 9.0, 3.0], 1) == 3.0


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


def test_breakdown_trace_finds_the_step_where_w_adv_fits_better_than_w(tmp_path):
  import numpy as np

  sys.path.insert(0, str(SCRIPT.parent))
  import aace_breakdown

  steps = {
    "loss": [2.0, 1.5, 1.2, 1.4],
    "perturbed_loss": [2.1, 1.6, 1.0, 0.9],  # below 0.9 x the loss at w from step 2 (1.0 < 1.08)
    "accuracy": [0.1, 0.3, 0.5, 0.4],
    "perturbation_norm": [0.1, 0.2, 0.4, 0.5],
    "param_norm": [20.0, 20.0, 20.0, 20.0],
  }
  assert aace_breakdown.first_breakdown(steps) == 2
  line = aace_breakdown.describe("aace_sam", {"steps": steps, "steps_per_epoch": 2})
  assert line.startswith(
    "aace_sam: from step 2 (epoch 2) the loss at w_adv (1.000) is below 0.9 x the loss at w (1.200)"
  )
  assert f"exp(-loss) {np.exp(-1.2):.3f}" in line and "||e||/||w|| 0.0225" in line
  assert aace_breakdown.first_breakdown({**steps, "perturbed_loss": steps["loss"]}) is None

  result = subprocess.run(
    [
      sys.executable,
      str(SCRIPT.parent / "aace_breakdown.py"),
      "--config",
      str(SCRIPT.parents[1] / "train" / "configs" / "default.py"),
      "--methods=sgd,aace_sam:rho=20.0",
      "--epochs=1",
      f"--out={tmp_path}",
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0].startswith("sgd: no step with the loss at w_adv below") and lines[1].startswith("aace_sam:rho=20.0: ")
  trace = json.loads((tmp_path / "trace.json").read_text())
  assert len(trace["sgd"]["steps"]["loss"]) == trace["sgd"]["steps_per_epoch"] == 1438 // 128
  assert trace["sgd"]["steps"]["loss"] == trace["sgd"]["steps"]["perturbed_loss"]
  assert (tmp_path / "trace.png").read_bytes()[:4] == b"\x89PNG"
