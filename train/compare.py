"""SGD vs SAM vs AACE-SAM (and variants) over several seeds: a markdown table and a plot per dataset.

  python train/compare.py --seeds 5
  python train/compare.py --seeds 3 --config train/configs/default.py --config.num_epochs=10
  python train/compare.py --seeds 3 --config train/configs/fashion_mnist.py \
      --methods sgd,sam,aace_sam,aace_sam:normalize=True:rho=0.05
  python train/compare.py --paper wrn28_10 --seeds 3 --config.data_dir=$HOME/tensorflow_datasets

`--methods` lists what to compare: a training method (`sgd`, `sam`,
`aace_sam`, `asam`), optionally followed by `:FIELD=VALUE` config changes
that make it a variant (`aace_sam:max_perturbation_norm=1.0`).

With `--paper MODEL` it runs the paper's table: the authors' runs of
`train/configs/paper.py` (SGD 400 epochs, SAM rho 0.05 normalized, AACE-SAM
rho 0.2) on each of `--datasets` (default: the paper's four), with the
`--config.FIELD` overrides of the command line applied to each.

Each (method, seed) is a full `train_and_evaluate` run in its own workdir
under `--workdir`; the table (mean +- std of the final test accuracy, and
seconds per epoch) is printed and written to `compare.md`, the plot of test
accuracy per epoch to `compare.png`. Seconds per epoch leave out the first
epoch, which includes compilation.
"""

import itertools
import os
import pathlib
import re
import sys
import time
from typing import Optional

if __package__ in (None, ""):  # run as a script: make `train` and `aace_jax` importable
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from train import checkpointing  # noqa: E402
from train import compilation_cache  # noqa: E402
from train import config_checks  # noqa: E402
from train import methods  # noqa: E402
from train import run_files  # noqa: E402
from train import train  # noqa: E402
from train import variants  # noqa: E402
from train.configs import paper  # noqa: E402

METHODS = ("sgd", "sam", "aace_sam")
DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parent / "configs" / "default.py")

FLAGS = flags.FLAGS
flags.DEFINE_integer("seeds", 5, "Runs per method, with seeds 0..N-1 added to config.seed.", lower_bound=1)
flags.DEFINE_string("workdir", None, "Where the runs and the report go; default: a new folder under ./runs/.")
config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "The config every run starts from.", lock_config=True)
flags.DEFINE_bool("dry_run", False, "Check the command and the config, print the plan, and exit.")
flags.DEFINE_enum("paper", None, sorted(paper.MODELS), "Run the authors' recipe for this model on --datasets.")
flags.DEFINE_list("datasets", list(paper.DATASETS), "With --paper: the datasets of the table.")
flags.DEFINE_list("methods", list(METHODS), "METHOD[:FIELD=VALUE...] of each row; without --paper only.")
flags.DEFINE_list("baseline", None, "The --methods entries every other method is compared with; default: the first.")


def planned_runs(base) -> list[tuple[str, str, object]]:
  """(dataset, method, config) of every method on every dataset, before seeds."""
  if FLAGS.paper is None:
    unknown = sorted(set(FLAGS.baseline or ()) - set(FLAGS.methods))
    if unknown:
      raise config_checks.ConfigError(f"--baseline {','.join(unknown)} is not among --methods {FLAGS.methods}.")
    return [(base.dataset, spec, variants.method_config(base, spec)) for spec in FLAGS.methods]
  if FLAGS["methods"].present:
    raise config_checks.ConfigError("--methods is for a comparison of one config; --paper runs the paper's three.")
  unknown = sorted(set(FLAGS.datasets) - set(paper.DATASETS))
  if unknown:
    raise config_checks.ConfigError(
      f"Bad config: --datasets {unknown} are not among the paper's {list(paper.DATASETS)}."
    )
  overrides = config_flags.get_override_values(FLAGS["config"])
  runs = []
  for dataset in FLAGS.datasets:
    for method in METHODS:
      config = paper.get_config(f"{FLAGS.paper},{dataset},{method}")
      config.update_from_flattened_dict(overrides)
      runs.append((dataset, method, config))
  return runs


def finished_rows(config, run_dir: str) -> Optional[list[dict]]:
  """The metrics.csv rows of a finished run of `config` in `run_dir`, or None when it has to run (or resume).

  Finished: its config.json holds the same recipe and its CSV a row for every
  epoch. The CSV is written after the checkpoint that holds its row, so a
  finished CSV is a finished run; anything else goes to `train_and_evaluate`,
  which resumes it or says why it cannot.
  """
  rows = run_files.RunFiles(run_dir, enabled=False).read() if os.path.isdir(run_dir) else []
  if [row["epoch"] for row in rows] != list(range(config.num_epochs)):
    return None
  try:
    config_checks.check_resumable(config, run_dir)
  except config_checks.ConfigError:
    return None
  return rows


def markdown_table(results: dict, config) -> str:
  lines = [
    f"{config.model} on {config.dataset}, {config.num_epochs} epochs, {len(next(iter(results.values())))} seeds",
    "",
    "| method | rho | test accuracy (mean +- std) | train accuracy at w, last epoch | s/epoch |",
    "| --- | --- | --- | --- | --- |",
  ]
  for spec, runs in results.items():
    method, _ = variants.parse_method(spec)
    accuracies = np.array([run["val_acc"] for run in runs]) * 100
    train_accuracies = np.array([run["train_acc"] for run in runs]) * 100
    seconds = np.mean([run["seconds_per_epoch"] for run in runs])
    rho = "-" if method == "sgd" else runs[0]["rho"]
    lines.append(
      f"| {spec} | {rho} | {accuracies.mean():.2f} +- {accuracies.std():.2f} |"
      f" {train_accuracies.mean():.2f} +- {train_accuracies.std():.2f} | {seconds:.2f} |"
    )
  return "\n".join(lines)


def plot(curves: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for method, runs in curves.items():
    accuracies = np.array(runs) * 100
    epochs = np.arange(1, accuracies.shape[1] + 1)
    mean, std = accuracies.mean(0), accuracies.std(0)
    ax.plot(epochs, mean, label=method)
    ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
  ax.set_xlabel("epoch")
  ax.set_ylabel("test accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    runs = planned_runs(FLAGS.config)
    for _, _, config in runs:
      config_checks.check_config(config, device_count=None if FLAGS.dry_run else -1)
  except config_checks.ConfigError as error:
    sys.exit(f"error: {error}")
  if FLAGS.dry_run:
    for dataset, method, config in runs:
      print(f"would run {method} on {dataset} ({config.model}, {config.num_epochs} epochs) x {FLAGS.seeds} seeds")
    return
  workdir = FLAGS.workdir or os.path.join("runs", f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
  compilation_cache.enable(runs[0][2])
  results, curves, configs = {}, {}, {}
  try:
    # Seed by seed, every method of a seed before the next seed: the runs finished at any moment are paired.
    for offset, (dataset, method, base) in itertools.product(range(FLAGS.seeds), runs):
      config = base.copy_and_resolve_references()
      config.unlock()
      config.seed = base.seed + offset
      folder = re.sub(r"[^\w.=-]+", "_", method)
      run_dir = os.path.join(workdir, dataset if FLAGS.paper else "", f"{folder}-seed{config.seed}")
      rows = finished_rows(config, run_dir)
      if rows is None:
        result = train.train_and_evaluate(config, run_dir)
        if result["stopped_by"] in train.SIGNAL_STOPS and not result["finished"]:
          train.ignore_stop_signals()
          sys.exit(f"stopped by {result['stopped_by']} in {run_dir}; rerun the same command to resume the comparison.")
        rows = run_files.RunFiles(run_dir, enabled=False).read()
      walls = [row["wall_time"] for row in rows]
      result = dict(rows[-1])
      # After the first epoch, which includes compilation.
      result["seconds_per_epoch"] = (walls[-1] - walls[0]) / (len(walls) - 1) if len(walls) > 1 else walls[0]
      result["rho"] = methods.rho(config)
      results.setdefault(dataset, {}).setdefault(method, []).append(result)
      curves.setdefault(dataset, {}).setdefault(method, []).append([row["val_acc"] for row in rows])
      configs[dataset] = config
      print(f"{method} on {dataset}, seed {config.seed}: test accuracy {result['val_acc']:.4f}", flush=True)
  except checkpointing.CheckpointWriteError as error:
    train.exit_now(f"error: {error}")  # orbax's threads for later writes would keep the process alive
  except train.RUN_ERRORS as error:
    sys.exit(f"error: {error}")
  tables = "\n\n".join(markdown_table(results[dataset], configs[dataset]) for dataset in results)
  pathlib.Path(workdir, "compare.md").write_text(tables + "\n")
  for dataset in curves:
    plot(curves[dataset], os.path.join(workdir, "compare.png" if len(curves) == 1 else f"compare-{dataset}.png"))
  print(tables)
  print(f"\nreport: {os.path.abspath(os.path.join(workdir, 'compare.md'))}, plots beside it")


if __name__ == "__main__":
  app.run(main)
