"""Test accuracy per epoch of several comparisons side by side, from their compare.csv files.

  python train/plot_comparisons.py runs/label_noise/0.0 runs/label_noise/0.4 \
      --titles "no label noise,40% label noise" --out label_noise.png

Each folder is a `train/compare.py` workdir (or any folder holding its
compare.csv); each gets a panel with one line per method: the mean over the
seeds of the test accuracy at the epochs where the test split was evaluated,
and a band of one std (ddof 0).
"""

import argparse
import csv
import os
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make `train` importable
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402

from train import compare_report  # noqa: E402
from train import run_files  # noqa: E402


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("folders", nargs="+", help="compare.py workdirs, each holding compare.csv")
  parser.add_argument("--titles", help="comma-separated panel titles (default: the folders' names)")
  parser.add_argument("--column", default="test_acc", help="the compare.csv column to plot (test_acc, validation_acc)")
  parser.add_argument("--out", required=True, help="the PNG to write")
  args = parser.parse_args(argv)
  args.titles = args.titles.split(",") if args.titles else [os.path.basename(os.path.normpath(f)) for f in args.folders]
  if len(args.titles) != len(args.folders):
    parser.error(f"--titles names {len(args.titles)} panels for {len(args.folders)} folders")
  return args


def read_curves(folder: str, column: str) -> dict[str, np.ndarray]:
  """`{method: [seeds, epochs] array}` of `column`, in percent, from `folder`/compare.csv."""
  runs: dict[tuple[str, str], dict[int, float]] = {}
  with open(os.path.join(folder, "compare.csv"), newline="") as f:
    for row in csv.DictReader(f):
      runs.setdefault((row["method"], row["seed"]), {})[int(row["epoch"])] = 100 * float(row[column])
  curves: dict[str, list] = {}
  for (method, _), epochs in runs.items():
    curves.setdefault(method, []).append([epochs[e] for e in sorted(epochs)])
  return {method: np.array(values) for method, values in curves.items()}


def plot(args) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(args.folders), figsize=(5.5 * len(args.folders), 4.2), sharey=True, squeeze=False)
  for ax, folder, title in zip(axes[0], args.folders, args.titles):
    for method, values in read_curves(folder, args.column).items():
      compare_report.draw_mean_and_spread(ax, f"{method} ({len(values)} seeds)", values)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel(f"{args.column.replace('_acc', ' accuracy').replace('_', ' ')} (%)")
  fig.tight_layout()
  run_files.atomic_write(args.out, lambda f: fig.savefig(f, dpi=100, format="png"))
  plt.close(fig)


def main(argv=None):
  plot(parse_args(argv))


if __name__ == "__main__":
  main()
