"""SGD vs SAM vs AACE-SAM over several seeds: a markdown table and one plot.

  python train/compare.py --seeds 5
  python train/compare.py --seeds 3 --config train/configs/default.py --config.num_epochs=10

Each (method, seed) is a full `train_and_evaluate` run in its own workdir
under `--workdir`; the table (mean +- std of the final test accuracy, and
seconds per epoch) is printed and written to `compare.md`, the plot of test
accuracy per epoch to `compare.png`. Seconds per epoch leave out the first
epoch, which includes compilation.
"""

import os
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make `train` and `aace_jax` importable
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from train import train  # noqa: E402

METHODS = ("sgd", "sam", "aace_sam")
DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parent / "configs" / "default.py")

FLAGS = flags.FLAGS
flags.DEFINE_integer("seeds", 5, "Runs per method, with seeds 0..N-1 added to config.seed.", lower_bound=1)
flags.DEFINE_string("workdir", None, "Where the runs and the report go; default: a new folder under ./runs/.")
config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "The config every run starts from.", lock_config=True)
flags.DEFINE_bool("dry_run", False, "Check the command and the config, print the plan, and exit.")


def markdown_table(results: dict, config) -> str:
  lines = [
      f"{config.model} on {config.dataset}, {config.num_epochs} epochs, {len(next(iter(results.values())))} seeds",
      "",
      "| method | rho | test accuracy (mean +- std) | s/epoch |",
      "| --- | --- | --- | --- |",
  ]
  for method, runs in results.items():
    accuracies = np.array([run["val_acc"] for run in runs]) * 100
    seconds = np.mean([run["seconds_per_epoch"] for run in runs])
    rho = "-" if method == "sgd" else train.DEFAULT_RHO[method] if config.rho is None else config.rho
    lines.append(f"| {method} | {rho} | {accuracies.mean():.2f} +- {accuracies.std():.2f} | {seconds:.2f} |")
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
  base = FLAGS.config
  if FLAGS.dry_run:
    try:
      train.check_config(base, device_count=None)
    except train.ConfigError as error:
      sys.exit(f"error: {error}")
    print(f"would run {', '.join(METHODS)} x {FLAGS.seeds} seeds from config:\n{base}")
    return
  workdir = FLAGS.workdir or os.path.join("runs", f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
  results, curves = {}, {}
  try:
    for method in METHODS:
      for offset in range(FLAGS.seeds):
        config = base.copy_and_resolve_references()
        config.unlock()
        config.optimizer = method
        config.seed = base.seed + offset
        run_dir = os.path.join(workdir, f"{method}-seed{config.seed}")
        result = train.train_and_evaluate(config, run_dir)
        rows = train.RunFiles(run_dir, enabled=False).rows()
        walls = [row["wall_time"] for row in rows]
        # After the first epoch, which includes compilation.
        result["seconds_per_epoch"] = (walls[-1] - walls[0]) / (len(walls) - 1) if len(walls) > 1 else walls[0]
        results.setdefault(method, []).append(result)
        curves.setdefault(method, []).append([row["val_acc"] for row in rows])
        print(f"{method} seed {config.seed}: test accuracy {result['val_acc']:.4f}", flush=True)
  except (train.ConfigError, ValueError) as error:
    sys.exit(f"error: {error}")
  table = markdown_table(results, base)
  pathlib.Path(workdir, "compare.md").write_text(table + "\n")
  plot(curves, os.path.join(workdir, "compare.png"))
  print(table)
  print(f"\nreport: {os.path.abspath(os.path.join(workdir, 'compare.md'))}, plot: compare.png beside it")


if __name__ == "__main__":
  app.run(main)
