"""Step by step: where a sharpness-aware run's perturbation leaves its weights' neighbourhood.

    python benchmarks/aace_breakdown.py --epochs 2 --out /tmp/breakdown
    python benchmarks/aace_breakdown.py --methods aace_sam:model=mnist_cnn,aace_sam --config.train_examples=60000

Each `--methods` entry (as in `train/compare.py`: METHOD[:FIELD=VALUE...])
trains the trainer's own step on `--config` (default: the Fashion-MNIST
config's `memorize` regime) for `--epochs` epochs and records, at every step, the training loss
at `w` and at `w_adv`, the geometric-mean probability of the true class
`exp(-loss)`, the first pass's accuracy, `||w_adv - w||` and `||w||`. It
prints, for each entry, the first step where the loss at `w_adv` falls below
0.9 x the loss at `w` (the trainer's breakdown warning, `train.breakdown_warning`)
with what the model looked like then, and writes `trace.json` and
`trace.png` to `--out`.
"""

import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from train import variants  # noqa: E402

DEFAULT_METHODS = ["aace_sam:model=mnist_cnn", "aace_sam", "aace_sam:model=mnist_cnn:normalize=True:rho=0.05"]
RECORDED = ("loss", "loss_at_w_adv", "accuracy", "perturbation_norm", "param_norm")
CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "train" / "configs" / "fashion_mnist.py") + ":memorize"

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags, defined only when run as a script (importing this module defines none)."""
  flags.DEFINE_list("methods", DEFAULT_METHODS, "METHOD[:FIELD=VALUE...] of each trace.")
  flags.DEFINE_integer("epochs", 2, "Epochs per trace.", lower_bound=1)
  flags.DEFINE_string("out", None, "Folder for trace.json and trace.png.")
  config_flags.DEFINE_config_file("config", CONFIG, "The config every trace starts from.", lock_config=True)


def trace(config, epochs: int) -> dict:
  """The per-step record of `RECORDED` for `epochs` epochs of `config`, and the steps per epoch."""
  from train import train

  experiment = train.create_experiment(config)
  state, totals = experiment.init_state(), experiment.totals
  steps = {name: [] for name in RECORDED}
  for epoch in range(epochs):
    for index, batch in enumerate(experiment.train_batches(epoch, 0)):
      step_number = epoch * experiment.data.steps_per_epoch + index
      state, totals, metrics = experiment.train_step_at(step_number)(state, totals, batch)
      values = jax.device_get({name: metrics[name] for name in RECORDED})
      for name in RECORDED:
        steps[name].append(float(values[name]))
  return {"steps": steps, "steps_per_epoch": experiment.data.steps_per_epoch}


def first_breakdown(steps: dict, ratio: float = 0.9):
  """The first step whose loss at w_adv is below `ratio` x the loss at w, or None."""
  below = np.asarray(steps["loss_at_w_adv"]) < ratio * np.asarray(steps["loss"])
  return int(np.argmax(below)) if below.any() else None


def describe(spec: str, record: dict) -> str:
  steps, per_epoch = record["steps"], record["steps_per_epoch"]
  first = first_breakdown(steps)
  final = {name: np.mean(values[-per_epoch:]) for name, values in steps.items()}
  last_epoch = (
    f"last epoch: loss at w {final['loss']:.3f}, at w_adv {final['loss_at_w_adv']:.3f},"
    f" ||e||/||w|| {final['perturbation_norm'] / final['param_norm']:.4f}"
  )
  if first is None:
    return f"{spec}: no step with the loss at w_adv below 0.9 x the loss at w; {last_epoch}"
  at = {name: values[first] for name, values in steps.items()}
  return (
    f"{spec}: from step {first} (epoch {first // per_epoch + 1}) the loss at w_adv ({at['loss_at_w_adv']:.3f}) is"
    f" below 0.9 x the loss at w ({at['loss']:.3f}); then exp(-loss) {np.exp(-at['loss']):.3f}, accuracy"
    f" {at['accuracy']:.3f}, ||e|| {at['perturbation_norm']:.3f}, ||w|| {at['param_norm']:.2f}; {last_epoch}"
  )


def plot(records: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
  for spec, record in records.items():
    steps = record["steps"]
    line = top.plot(np.asarray(steps["perturbation_norm"]) / np.asarray(steps["param_norm"]), label=spec)[0]
    bottom.plot(steps["loss"], color=line.get_color(), label=f"{spec}, at w")
    bottom.plot(steps["loss_at_w_adv"], color=line.get_color(), linestyle=":", label="at w_adv")
  top.set_ylabel("||w_adv - w|| / ||w||")
  top.set_yscale("log")
  bottom.set_ylabel("training loss (: at w_adv)")
  bottom.set_xlabel("step")
  top.legend(fontsize=7)
  for ax in (top, bottom):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  records = {}
  for spec in FLAGS.methods:
    config = variants.method_config(FLAGS.config, spec)
    config.num_epochs = FLAGS.epochs
    records[spec] = trace(config, FLAGS.epochs)
    print(describe(spec, records[spec]), flush=True)
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "trace.json"), "w") as f:
      json.dump(records, f)
    plot(records, os.path.join(FLAGS.out, "trace.png"))


if __name__ == "__main__":
  define_flags()
  app.run(main)
