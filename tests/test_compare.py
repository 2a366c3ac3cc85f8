"""train/compare.py: the paired statistics against scipy and a hand calculation, the files it writes, pairing,
more seeds later, and a stop in the middle."""

import csv
import itertools
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

from tests.helpers import XLA_CACHE
from train import compare_report
from train import paired_comparison

REPO = pathlib.Path(__file__).resolve().parents[1]


def exact_sign_flip_p(differences) -> float:
  """Two-sided p of the sign-flip test, by enumerating every sign pattern (no scipy)."""
  observed = abs(np.mean(differences))
  means = [abs(np.mean(np.array(signs) * differences)) for signs in itertools.product((1, -1), repeat=len(differences))]
  return float(np.mean(np.array(means) >= observed - 1e-12))


def test_the_statistics_are_scipys_on_results_with_a_known_answer():
  rng = np.random.default_rng(0)
  baseline = 80 + rng.normal(size=12)
  method = baseline + 0.5 + 0.2 * rng.normal(size=12)  # better on every seed, by about 0.5
  differences = method - baseline
  result = paired_comparison.compare(method, baseline)
  assert result.seeds == 12 and result.mean_difference == pytest.approx(differences.mean())
  low, high = stats.t.interval(0.95, 11, loc=differences.mean(), scale=stats.sem(differences))
  assert result.t_interval == pytest.approx((low, high))
  assert low < 0.5 < high and low > 0
  assert result.p_value == pytest.approx(exact_sign_flip_p(differences)) and result.p_value == 2 / 2**12
  assert result.smallest_p_value == 2 / 2**12 and (result.wins, result.ties) == (12, 0) and result.established
  bootstrap = stats.bootstrap(
    (differences,), np.mean, n_resamples=9999, method="BCa", rng=np.random.default_rng(0)
  ).confidence_interval
  assert result.bootstrap_interval == pytest.approx((bootstrap.low, bootstrap.high))
  assert result.bootstrap_interval[0] < differences.mean() < result.bootstrap_interval[1]
  # No effect: differences symmetric about 0.
  noise = rng.normal(size=10)
  null = paired_comparison.compare(baseline[:10] + noise, baseline[:10])
  assert null.p_value == pytest.approx(exact_sign_flip_p(noise)) and null.p_value > 0.05 and not null.established


def test_a_small_case_by_hand():
  # d = (1, 2, 3): mean 2, sample sd 1, t(0.975, 2) = 4.302653; of the 8 sign patterns, (+,+,+) and (-,-,-)
  # reach |mean| >= 2: p = 2/8.
  result = paired_comparison.compare([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
  half_width = 4.302653 / math.sqrt(3)
  assert result.mean_difference == pytest.approx(2.0)
  assert result.t_interval == pytest.approx((2 - half_width, 2 + half_width), abs=1e-5)
  assert (result.p_value, result.smallest_p_value, result.wins) == (0.25, 0.25, 3)
  assert not result.established  # 3 seeds cannot reach p < 0.05
  same = paired_comparison.compare([1.0, 2.0], [1.0, 2.0])
  assert (same.mean_difference, same.t_interval, same.p_value, same.ties) == (0.0, (0.0, 0.0), 1.0, 2)
  with pytest.raises(ValueError, match="at least 2 seeds"):
    paired_comparison.compare([1.0], [2.0])


def record(method, seed, validation, test):
  rows = [
    {"epoch": e, "val_acc": t, "holdout_acc": v, "train_acc": 1.0, "wall_time": float(e)}
    for e, (v, t) in enumerate(zip(validation, test))
  ]
  return compare_report.RunRecord("toy", method, seed, 0.05, rows, None)


def test_the_best_epoch_is_chosen_on_the_validation_split_and_pairs_are_by_seed():
  run = record("a", 1, validation=[0.5, 0.7, 0.7, 0.6], test=[0.1, 0.2, 0.9, 0.3])
  assert run.best_validation_epoch == 1  # the first of the two best, whatever the test split says
  assert run.best_validation == pytest.approx(20.0) and run.final == pytest.approx(30.0)
  records = [
    record("a", 1, [0.5], [0.50]),
    record("a", 2, [0.5], [0.60]),
    record("a", 3, [0.5], [0.70]),
    record("b", 2, [0.5], [0.55]),
    record("b", 3, [0.5], [0.60]),
    record("b", 4, [0.5], [0.90]),
  ]
  seeds, a, b = compare_report.paired_values(records, "a", "b", "final")
  assert seeds == [2, 3] and a.tolist() == pytest.approx([60, 70]) and b.tolist() == pytest.approx([55, 60])
  [final, best] = compare_report.comparisons(records, ["a", "b"], ["b"])
  assert final["measure"] == "final" and final["mean_difference"] == pytest.approx(7.5)
  assert best["measure"] == "best_validation" and best["seed_list"] == [2, 3]


def compare_command(workdir, seeds, *extra):
  return [
    sys.executable,
    str(REPO / "train" / "compare.py"),
    f"--seeds={seeds}",
    f"--workdir={workdir}",
    "--methods=sgd,sam:rho=0.0",
    "--config.num_epochs=2",
    "--config.validation_examples=200",
    "--config.label_noise=0.3",
    "--config.augment=flip_cutout",
    f"--config.compilation_cache_dir={XLA_CACHE}",
    *extra,
  ]


def test_paired_runs_files_to_recompute_every_number_and_more_seeds_later(tmp_path):
  result = subprocess.run(compare_command(tmp_path, 2, "--jobs=2"), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "compare.csv", newline="") as f:
    epochs = list(csv.DictReader(f))
  assert len(epochs) == 2 * 2 * 2  # methods x seeds x epochs
  by_run = {(row["method"], row["seed"], row["epoch"]): row for row in epochs}
  # Paired: SAM with rho 0 takes SGD's steps exactly, so every number of a seed is SGD's if, and only if, both
  # saw the same initialization, data order, subset, validation split, noisy labels and augmentation draws.
  for seed, epoch in itertools.product(("42", "43"), ("0", "1")):
    sgd, sam = by_run[("sgd", seed, epoch)], by_run[("sam:rho=0.0", seed, epoch)]
    for column in ("train_loss", "train_acc", "validation_acc", "test_acc", "test_loss"):
      assert sgd[column] == sam[column], (seed, epoch, column)
  assert by_run[("sgd", "42", "1")]["train_loss"] != by_run[("sgd", "43", "1")]["train_loss"]  # seeds differ
  summary = json.loads((tmp_path / "compare.json").read_text())
  for run in summary["runs"]:
    last = by_run[(run["method"], str(run["seed"]), "1")]
    assert run["final_test_acc"] == pytest.approx(100 * float(last["test_acc"]))
    assert run["label_noise"]["rate"] == 0.3 and 0.2 < run["label_noise"]["training_rate"] < 0.4
  [final] = [c for c in summary["comparisons"] if c["measure"] == "final"]
  assert (final["method"], final["baseline"], final["seeds"]) == ("sam:rho=0.0", "sgd", 2)
  assert final["mean_difference"] == 0 and final["ties"] == 2 and not final["established"]
  report = (tmp_path / "compare.md").read_text()
  assert "| sam:rho=0.0 | sgd | 2 | +0.00 |" in report and "2/2^2 = 0.500" in report
  # A later --seeds 3 trains seed 44 only.
  finished = {path: path.stat().st_mtime_ns for path in tmp_path.glob("*-seed4[23]/metrics.csv")}
  result = subprocess.run(compare_command(tmp_path, 3, "--jobs=1"), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert {path: path.stat().st_mtime_ns for path in finished} == finished
  assert sorted(p.name for p in tmp_path.glob("*-seed44")) == ["sam_rho=0.0-seed44", "sgd-seed44"]
  summary = json.loads((tmp_path / "compare.json").read_text())
  assert sorted(run["seed"] for run in summary["runs"]) == [42, 42, 43, 43, 44, 44]


def test_a_stopped_comparison_resumes_where_it_stopped(tmp_path):
  command = compare_command(tmp_path, 2, "--jobs=2", "--config.num_epochs=4")
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not list(tmp_path.glob("*/metrics.csv")) and time.time() < deadline:
    time.sleep(0.5)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 1 and "rerun the same command to resume" in stderr.strip().splitlines()[-1], stderr
  finished = [p for p in tmp_path.glob("*-seed*/metrics.csv") if len(list(csv.DictReader(open(p)))) == 4]
  assert len(finished) < 4  # it did stop in the middle
  result = subprocess.run(command, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  for run in tmp_path.glob("*-seed*"):
    with open(run / "metrics.csv", newline="") as f:
      assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(4))
    assert not (run / "claim").exists()
  assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


@pytest.mark.parametrize(
  "arguments, message",
  [
    (["--methods=sgd,sam", "--baseline=asam"], "error: --baseline asam is not among --methods ['sgd', 'sam']."),
    (
      ["--config.label_nois=0.4"],
      'error: unknown config field in --config.label_nois=0.4; Did you mean "label_noise" instead of "label_nois"?',
    ),
    (["--config.label_noise=1.5"], "error: Bad config: label_noise must be a fraction in [0, 1), got 1.5."),
  ],
)
def test_a_bad_command_is_one_line(arguments, message):
  command = [sys.executable, str(REPO / "train" / "compare.py"), "--dry_run", *arguments]
  result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [message]


def test_comparisons_are_plotted_side_by_side_from_their_csv_files(tmp_path):
  from train import plot_comparisons

  for level, accuracies in (("low", (0.5, 0.6)), ("high", (0.3, 0.2))):
    (tmp_path / level).mkdir()
    lines = ["dataset,method,seed,epoch,test_acc"]
    lines += [f"toy,sgd,{seed},{epoch},{accuracies[epoch] + seed / 100}" for seed in (1, 2) for epoch in (0, 1)]
    (tmp_path / level / "compare.csv").write_text("\n".join(lines) + "\n")
  curves = plot_comparisons.read_curves(str(tmp_path / "low"), "test_acc")
  np.testing.assert_allclose(curves["sgd"], [[51, 61], [52, 62]])
  out = tmp_path / "side_by_side.png"
  plot_comparisons.main([str(tmp_path / "low"), str(tmp_path / "high"), "--titles", "low,high", "--out", str(out)])
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(SystemExit):
    plot_comparisons.parse_args([str(tmp_path / "low"), "--titles", "a,b", "--out", str(out)])
