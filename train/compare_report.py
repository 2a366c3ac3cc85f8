"""What `train/compare.py` reports of finished runs: the tables, the paired statistics, the files and the plot.

Every number comes from the runs' own files (metrics.csv, data.json), so a
report can be written again, or extended with more seeds, at any time:

- ``compare.md``: per method, the test accuracy at the last epoch and at the
  epoch of best validation accuracy (mean and sample std over the seeds),
  then each method against each baseline, paired by seed
  (`train/paired_comparison.py`);
- ``compare.json``: the same numbers, every run's per-seed values and every
  comparison, machine-readable;
- ``compare.csv``: every epoch of every run, the columns named for their
  split (``test_acc`` is metrics.csv's ``val_acc``, ``validation_acc`` its
  ``holdout_acc``);
- ``compare.png``: test (and validation) accuracy per epoch, mean and std
  over the seeds.

Accuracies are in percent and differences in percentage points. Nothing is
chosen on the test split: the best epoch is the first with the highest
validation accuracy.
"""

import csv
import io
import json
import math
import os
from typing import NamedTuple
from typing import Optional

import numpy as np

from train import paired_comparison
from train import run_files

# compare.csv's columns and the metrics.csv column each comes from.
CSV_FROM_METRICS = {
  "epoch": "epoch",
  "lr": "lr",
  "train_loss": "train_loss",
  "train_acc": "train_acc",
  "validation_loss": "holdout_loss",
  "validation_acc": "holdout_acc",
  "test_loss": "val_loss",
  "test_acc": "val_acc",
  "perturbation_norm": "avg_perturbation",
  "wall_time": "wall_time",
}
MEASURES = {"final": "test accuracy at the last epoch", "best_validation": "test accuracy at the best-validation epoch"}


class RunRecord(NamedTuple):
  """A finished run, as the report reads it.

  Attributes:
    dataset, method, seed: which run (`method` is the `--methods` entry).
    rho: its perturbation size (`methods.rho`).
    rows: its metrics.csv rows.
    label_noise: data.json's label noise (None without noise, or without the file).
  """

  dataset: str
  method: str
  seed: int
  rho: float
  rows: list
  label_noise: Optional[dict]

  @property
  def final(self) -> float:
    """Test accuracy (%) at the last epoch."""
    return 100 * self.rows[-1]["val_acc"]

  @property
  def best_validation_epoch(self) -> Optional[int]:
    """The first epoch with the highest validation accuracy; None without a validation split."""
    validation = np.array([row["holdout_acc"] for row in self.rows])
    if np.isnan(validation).all():
      return None
    return int(self.rows[int(np.nanargmax(validation))]["epoch"])

  @property
  def best_validation(self) -> Optional[float]:
    """Test accuracy (%) at `best_validation_epoch` (the trainer evaluates the test split there)."""
    epoch = self.best_validation_epoch
    return None if epoch is None else 100 * next(row["val_acc"] for row in self.rows if row["epoch"] == epoch)

  @property
  def seconds_per_epoch(self) -> float:
    """Wall seconds per epoch after the first, which includes the start-up and compilation."""
    walls = [row["wall_time"] for row in self.rows]
    return (walls[-1] - walls[0]) / (len(walls) - 1) if len(walls) > 1 else walls[0]


def read_label_noise(run_dir: str) -> Optional[dict]:
  try:
    with open(os.path.join(run_dir, "data.json")) as f:
      return json.load(f).get("label_noise")
  except (OSError, ValueError):
    return None


def paired_values(records: list, method: str, baseline: str, measure: str) -> tuple[list, np.ndarray, np.ndarray]:
  """`(seeds, method's values, baseline's values)` of `measure` over the seeds both finished, in seed order."""
  by_seed = {name: {r.seed: getattr(r, measure) for r in records if r.method == name} for name in (method, baseline)}
  seeds = sorted(set(by_seed[method]) & set(by_seed[baseline]))
  seeds = [seed for seed in seeds if by_seed[method][seed] is not None and by_seed[baseline][seed] is not None]
  return seeds, np.array([by_seed[method][s] for s in seeds]), np.array([by_seed[baseline][s] for s in seeds])


def comparisons(records: list, methods: list, baselines: list) -> list[dict]:
  """Every method against every baseline (once per pair), for each measure the runs have, with at least 2 paired
  seeds."""
  results = []
  for measure in MEASURES:
    for index, baseline in enumerate(baselines):
      for method in methods:
        if method == baseline or method in baselines[:index]:
          continue  # itself, or a pair an earlier baseline's rows hold the other way round
        seeds, values, baseline_values = paired_values(records, method, baseline, measure)
        if len(seeds) < 2:
          continue
        statistics = paired_comparison.compare(values, baseline_values)
        results.append({"measure": measure, "method": method, "baseline": baseline, "seed_list": seeds})
        results[-1].update(statistics._asdict())
  return results


def _mean_std(values: list) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  spread = np.std(values, ddof=1) if len(values) > 1 else float("nan")
  return f"{np.mean(values):.2f} +- {spread:.2f}"


def _interval(interval) -> str:
  return f"[{interval[0]:+.2f}, {interval[1]:+.2f}]"


def _p(value: float) -> str:
  return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def method_table(records: list, methods: list) -> list[str]:
  lines = [
    "| method | rho | seeds | test accuracy, last epoch | test accuracy, best-validation epoch | best epoch"
    " (median, range) | train accuracy at w, last epoch | s/epoch |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for method in methods:
    runs = [r for r in records if r.method == method]
    if not runs:
      lines.append(f"| {method} | | 0 | not run | | | | |")
      continue
    epochs = [r.best_validation_epoch + 1 for r in runs if r.best_validation_epoch is not None]
    best = f"{int(np.median(epochs))} ({min(epochs)}-{max(epochs)})" if epochs else "-"
    rho = "-" if method.split(":")[0] == "sgd" else f"{runs[0].rho:g}"
    lines.append(
      f"| {method} | {rho} | {len(runs)} | {_mean_std([r.final for r in runs])} |"
      f" {_mean_std([r.best_validation for r in runs])} | {best} |"
      f" {_mean_std([100 * r.rows[-1]['train_acc'] for r in runs])} |"
      f" {np.mean([r.seconds_per_epoch for r in runs]):.2f} |"
    )
  return lines


def comparison_table(results: list, measure: str) -> list[str]:
  rows = [result for result in results if result["measure"] == measure]
  if not rows:
    return []
  lines = [
    f"{MEASURES[measure].capitalize()}: method - baseline, in points, paired by seed",
    "",
    "| method | baseline | seeds | difference | 95% t-interval | 95% bootstrap | sign-flip p | wins | reading |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    ties = f", {r['ties']} tied" if r["ties"] else ""
    lines.append(
      f"| {r['method']} | {r['baseline']} | {r['seeds']} | {r['mean_difference']:+.2f} | {_interval(r['t_interval'])}"
      f" | {_interval(r['bootstrap_interval'])} | {_p(r['p_value'])} | {r['wins']}/{r['seeds']}{ties} |"
      f" {'established' if r['established'] else 'not established'} |"
    )
  return [*lines, ""]


def markdown(dataset: str, config, records: list, methods: list, results: list) -> str:
  """The report of one dataset's runs: the methods, then every comparison of each measure."""
  seeds = sorted({r.seed for r in records})
  noise = next((r.label_noise for r in records if r.label_noise), None)
  data = [f"{config.train_examples or 'all the'} training examples"]
  if config.validation_examples:
    data.append(f"a validation split of {config.validation_examples}")
  if noise:
    data.append(f"{noise['kind']} label noise {noise['rate']:g} on the training and validation labels")
  consecutive = len(seeds) > 3 and seeds == list(range(seeds[0], seeds[-1] + 1))
  seed_text = f"{seeds[0]}-{seeds[-1]}" if consecutive else ", ".join(map(str, seeds))
  lines = [
    f"{config.model} on {dataset}, {config.num_epochs} epochs, {len(seeds)} seeds ({seed_text or 'none finished'});"
    f" {', '.join(data)}",
    "",
    *method_table(records, methods),
    "",
    "std: sample std over the seeds (ddof 1). Best epoch: the first epoch with the highest validation accuracy,"
    " counted from 1.",
    "",
  ]
  if results:
    n = max(r["seeds"] for r in results)
    lines += [
      f"Established: the t-interval leaves out 0 and the sign-flip p is below 0.05. With {n} seeds the"
      f" two-sided sign-flip p cannot go below 2/2^{n} = {_p(2 / 2**n)}.",
      "",
    ]
    for measure in MEASURES:
      lines += comparison_table(results, measure)
  return "\n".join(lines).rstrip() + "\n"


def epoch_csv(records: list) -> str:
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=["dataset", "method", "seed", *CSV_FROM_METRICS])
  writer.writeheader()
  for r in records:
    for row in r.rows:
      values = {column: row[source] for column, source in CSV_FROM_METRICS.items()}
      writer.writerow({"dataset": r.dataset, "method": r.method, "seed": r.seed, **values})
  return text.getvalue()


def _finite(value):
  """JSON has no NaN: None in its place."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def summary_json(records: list, results: list) -> str:
  runs = [
    {
      "dataset": r.dataset,
      "method": r.method,
      "seed": r.seed,
      "rho": r.rho,
      "label_noise": r.label_noise,
      "final_test_acc": r.final,
      "best_validation_epoch": r.best_validation_epoch,
      "best_validation_test_acc": r.best_validation,
      "final_train_acc": 100 * r.rows[-1]["train_acc"],
      "seconds_per_epoch": r.seconds_per_epoch,
    }
    for r in records
  ]
  document = {"units": "accuracy in %, differences in points", "runs": runs, "comparisons": results}
  return json.dumps(document, indent=1, default=_finite, allow_nan=False) + "\n"


def plot(records: list, methods: list, path: str, title: str = "") -> None:
  """Test and (where there is one) validation accuracy per epoch: mean and std over the seeds of each method."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [("val_acc", "test accuracy (%)")]
  if any(np.isfinite(row["holdout_acc"]) for r in records for row in r.rows):
    panels.append(("holdout_acc", "validation accuracy (%, noisy labels where there is noise)"))
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
  for ax, (column, label) in zip(axes[0], panels):
    draw_curves(ax, records, methods, column)
    ax.set_ylabel(label)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  run_files.atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
  plt.close(fig)


def draw_curves(ax, records: list, methods: list, column: str) -> None:
  """One line per method on `ax`: the mean of `column` (%) over the seeds at the epochs where it was evaluated."""
  for method in methods:
    runs = [r for r in records if r.method == method]
    if runs:
      draw_mean_and_spread(ax, method, np.array([[row[column] for row in r.rows] for r in runs]) * 100)
  ax.set_xlabel("epoch")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def draw_mean_and_spread(ax, label: str, values: np.ndarray) -> None:
  """The mean over seeds of `values` [seeds, epochs] and a band of one std (ddof 0), at the epochs every seed has
  (NaN: a split not evaluated that epoch)."""
  evaluated = np.isfinite(values).all(axis=0)
  epochs = np.arange(1, values.shape[1] + 1)[evaluated]
  mean, std = values[:, evaluated].mean(0), values[:, evaluated].std(0)
  ax.plot(epochs, mean, label=label, marker="." if len(epochs) < 30 else None)
  ax.fill_between(epochs, mean - std, mean + std, alpha=0.15)
