"""How far a sharpness-aware run's perturbation keeps its direction: the cosine between perturbations k steps apart.

    python benchmarks/perturbation_alignment.py --out /tmp/alignment
    python benchmarks/perturbation_alignment.py --methods aace_sam,sam --lags 1,4 --epochs 20 --seeds 2

Each `--methods` entry (as in `train/compare.py`: METHOD[:FIELD=VALUE...])
trains the trainer's own step on `--config` (default: the Fashion-MNIST
config's `memorize` regime, the comparison's) and, before every step, takes
the first-pass gradient the step's perturbation is built from (the
perturbation loss at `w` on the step's batch, BatchNorm in training mode):
AACE-SAM's perturbation is `-rho` times it, SAM's `rho` times it over its
norm, so the cosine between two perturbations is the cosine between their
gradients. Reported per epoch: the mean cosine between the perturbation of
each step and that of the step `lag` steps before, for each `--lags`. This is
what `perturb_every=k` relies on: a kept perturbation stands in for the
`k - 1` that follow. The measuring pass is extra work: the run is slower than
a training run, and its accuracy is the training step's. Writes
`alignment.json` to `--out`.
"""

import collections
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from train import variants  # noqa: E402

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "train" / "configs" / "fashion_mnist.py") + ":memorize"

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags, defined only when run as a script (importing this module defines none)."""
  flags.DEFINE_list("methods", ["aace_sam", "sam"], "METHOD[:FIELD=VALUE...] of each run.")
  flags.DEFINE_list("lags", ["1", "2", "4", "8"], "Steps between the perturbations compared.")
  flags.DEFINE_integer("epochs", None, "Epochs per run (default: the config's).", lower_bound=1)
  flags.DEFINE_integer("seeds", 1, "Runs per method, seeds 0..N-1 added to config.seed.", lower_bound=1)
  flags.DEFINE_string("out", None, "Folder for alignment.json.")
  config_flags.DEFINE_config_file("config", CONFIG, "The config every run starts from.", lock_config=True)


def first_pass_direction(experiment):
  """`(state, batch) -> the first-pass gradient, flattened`: the direction of the step's perturbation."""
  import aace_jax
  from aace_jax import _train_step
  from train import augment

  data, model, method = experiment.data, experiment.model, experiment.method

  @jax.jit
  def direction(state, batch):
    images = augment.normalize(batch["image"], data.mean, data.std)

    def objective(params):
      logits, _ = model.apply(
        {"params": params, **state.model_state}, images, train=True, mutable=list(state.model_state)
      )
      # The step's own batch mean of its first-pass loss, which gives a key to a loss that takes one.
      outputs = aace_jax.LossInputs(logits, batch["label"], None, state.model_state)
      return _train_step._loss_mean(method.perturbation_loss, outputs, jax.random.key(0))

    grads = jax.grad(objective)(state.params)
    return jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(grads)])

  return direction


def alignment(config, lags: list[int]) -> dict:
  """Per epoch, the mean cosine between each step's perturbation and the one `lag` steps before."""
  from train import train

  if config.augment != "none":
    raise SystemExit("the measuring pass sees the stored images: use a config without augmentation (--config ...)")
  experiment = train.create_experiment(config)
  direction = first_pass_direction(experiment)
  state, totals = experiment.init_state(), experiment.totals
  recent = collections.deque(maxlen=max(lags))
  epochs, step_number = [], 0
  for epoch in range(config.num_epochs):
    cosines = {lag: [] for lag in lags}
    for batch in experiment.train_batches(epoch, 0):
      current = np.asarray(direction(state, batch), np.float64)
      current /= np.linalg.norm(current) or 1.0
      for lag in lags:
        if len(recent) >= lag:
          cosines[lag].append(float(current @ recent[-lag]))
      recent.append(current)
      state, totals, metrics = experiment.train_step_at(step_number)(state, totals, batch)
      step_number += 1
    epochs.append({str(lag): float(np.mean(values)) if values else None for lag, values in cosines.items()})
    print(f"epoch {epoch + 1}: " + ", ".join(f"lag {lag} {value:.3f}" for lag, value in epochs[-1].items() if value))
  return {"epochs": epochs, "train_accuracy": float(metrics["accuracy"])}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  lags = [int(lag) for lag in FLAGS.lags]
  if not lags or min(lags) < 1:
    raise app.UsageError(f"--lags must be positive step counts, got {FLAGS.lags}")
  report = {"config": FLAGS.config.to_dict(), "lags": lags, "runs": {}}
  for entry in FLAGS.methods:
    for offset in range(FLAGS.seeds):
      config = variants.method_config(FLAGS.config, entry)
      config.unlock()
      config.seed += offset
      if FLAGS.epochs is not None:
        config.num_epochs = FLAGS.epochs
      print(f"{entry}, seed {config.seed}:", flush=True)
      report["runs"].setdefault(entry, []).append({"seed": config.seed, **alignment(config, lags)})
  text = json.dumps(report, indent=1)
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    path = os.path.join(FLAGS.out, "alignment.json")
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
