"""The benchmark scripts run and print the JSON objects the documentation describes (no timing asserted)."""

import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"


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


def test_input_pipeline_bad_arguments_are_rejected():
  result = subprocess.run([sys.executable, str(INPUT_SCRIPT), "--epochs", "1"], capture_output=True, text=True)
  assert result.returncode == 2 and "--epochs >= 2" in result.stderr


def test_breakdown_trace_finds_the_step_where_w_adv_fits_better_than_w(tmp_path):
  import numpy as np

  sys.path.insert(0, str(SCRIPT.parent))
  import aace_breakdown

  steps = {
    "loss": [2.0, 1.5, 1.2, 1.4],
    "loss_at_w_adv": [2.1, 1.6, 1.0, 0.9],  # below 0.9 x the loss at w from step 2 (1.0 < 1.08)
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
  assert aace_breakdown.first_breakdown({**steps, "loss_at_w_adv": steps["loss"]}) is None

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
  assert trace["sgd"]["steps"]["loss"] == trace["sgd"]["steps"]["loss_at_w_adv"]
  assert (tmp_path / "trace.png").read_bytes()[:4] == b"\x89PNG"


NORMS_SCRIPT = SCRIPT.parent / "norm_forms.py"


def test_norm_forms_reports_each_form_and_the_forms_differ_as_documented():
  result = subprocess.run(
    [sys.executable, str(NORMS_SCRIPT), "--models", "wrn16_4", "--batch", "2", "--steps", "1", "--json"],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.splitlines()[-1])
  forms = report["models"]["wrn16_4"]
  assert set(forms) == {"chunks_of_32", "one_vector", "per_leaf"}
  for form in forms.values():
    assert form["loss_finite"] and form["compile_seconds"] > 0 and form["step_seconds"] > 0
    assert form["parameter_leaves"] == 44
  # Reduced leaf by leaf, the step compiles the most kernels; in one vector, the fewest.
  assert forms["per_leaf"]["fusions"] > forms["chunks_of_32"]["fusions"] >= forms["one_vector"]["fusions"]


def test_norm_forms_bad_arguments_are_rejected():
  result = subprocess.run([sys.executable, str(NORMS_SCRIPT), "--forms", "flat"], capture_output=True, text=True)
  assert result.returncode == 2 and "--forms must name forms of" in result.stderr


ALIGNMENT_SCRIPT = SCRIPT.parent / "perturbation_alignment.py"


def test_the_alignment_benchmarks_direction_is_the_steps_first_pass_gradient():
  """Its norm is the step's own `first_pass_grad_norm`, at the same state and batch, for either perturbation loss.

  AACE (which takes a key) and cross-entropy (which does not) check that the
  benchmark passes a key exactly when the step does; `rand` draws its targets
  from a key of its own here, so only that it runs is checked.
  """
  import numpy as np

  from tests import helpers
  from train import train

  alignment = helpers.load_script(ALIGNMENT_SCRIPT, "perturbation_alignment")
  for method, mode in [("aace_sam", "ada"), ("sam", "ada"), ("aace_sam", "rand")]:
    experiment = train.create_experiment(helpers.small_config(method=method, aace_mode=mode, augment="none"))
    state, batch = experiment.init_state(), next(iter(experiment.train_batches(0, 0)))
    direction = np.asarray(alignment.first_pass_direction(experiment)(state, batch), np.float64)
    _, _, metrics = experiment.train_step(state, experiment.totals, batch)
    if mode != "rand":
      np.testing.assert_allclose(np.linalg.norm(direction), float(metrics["first_pass_grad_norm"]), rtol=1e-5)
    assert np.isfinite(direction).all() and np.linalg.norm(direction) > 0


def test_the_alignment_benchmark_writes_a_cosine_per_epoch_and_lag(tmp_path):
  config = str(SCRIPT.parents[1] / "train" / "configs" / "default.py")
  command = [sys.executable, str(ALIGNMENT_SCRIPT), f"--config={config}", "--config.augment=none"]
  command += ["--config.num_epochs=2", "--config.compilation_cache=False", "--methods=sam", "--lags=1,3"]
  result = subprocess.run(command + [f"--out={tmp_path}"], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((tmp_path / "alignment.json").read_text())
  (run,) = report["runs"]["sam"]
  assert report["lags"] == [1, 3] and len(run["epochs"]) == 2 and 0 <= run["train_accuracy"] <= 1
  for epoch in run["epochs"]:
    assert set(epoch) == {"1", "3"} and all(-1 <= cosine <= 1 for cosine in epoch.values())

  refused = subprocess.run(command[:3] + ["--lags=0"], capture_output=True, text=True)
  assert refused.returncode == 1 and "--lags must be positive step counts" in refused.stderr


def test_the_old_optimizer_flag_still_names_the_method_with_a_warning():
  sys.path.insert(0, str(SCRIPT.parent))
  import first_step
  import input_pipeline

  for script in (first_step, input_pipeline):
    assert script.parse_args(["--method", "sam"]).method == "sam"
    with pytest.warns(FutureWarning, match=r"--optimizer is deprecated .* it is now --method \(--method asam\)"):
      assert script.parse_args(["--optimizer", "asam"]).method == "asam"


def run_time_report(mode: str, *arguments) -> dict:
  """The JSON report of `benchmarks/run_time.py MODE` on the default config's SAM."""
  config = str(SCRIPT.parents[1] / "train" / "configs" / "default.py")
  command = [sys.executable, str(SCRIPT.parent / "run_time.py"), mode, "--config", config, "--method", "sam", "--json"]
  result = subprocess.run([*command, *arguments], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_runs_time_is_broken_down_and_vmapped_seeds_are_timed_per_seed():
  report = run_time_report("breakdown", "--epochs", "2", "--set", "test_every_epochs=2")
  assert report["changes"] == ["test_every_epochs=2"] and report["steps"] == 2 * (1438 // 128)
  parts = report["seconds"]
  assert {"training steps after the first", "evaluation of the test split", "plots", "imports"} <= set(parts)
  # The parts are measured inside the run and add up to its whole time, "other" holding what none measured.
  assert sum(parts.values()) == pytest.approx(report["total_seconds"])
  assert all(seconds >= 0 for seconds in parts.values())
  report = run_time_report("seeds", "--seeds", "2", "--rounds", "2")
  per_step, per_seed = report["seconds_per_step"], report["seconds_per_seed_step"]
  assert set(per_step) == {"one seed", "2 seeds, same batch", "2 seeds, own batches"}
  assert per_seed["2 seeds, own batches"] == pytest.approx(per_step["2 seeds, own batches"] / 2)
