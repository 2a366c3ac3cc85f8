"""An epoch's row of metrics.csv, in one place: its columns, the step metrics they average, the running
totals the step keeps, what a checkpoint holds of it, and how it is plotted."""

import jax
import jax.numpy as jnp
import numpy as np

CSV_COLUMNS = (
  "epoch",
  "lr",
  "avg_ce_loss",
  "avg_aace_loss",
  "avg_aace_ce",
  "avg_grad_norm",
  "avg_perturbation",
  "avg_param_norm",
  "train_loss",
  "train_acc",
  "val_loss",
  "val_acc",
  "holdout_loss",
  "holdout_acc",
  "skipped_steps",
  "images_per_sec",
  "wall_time",
)
# The CSV columns that a checkpoint holds: all but the timing, which differs between runs.
TIMING_COLUMNS = ("images_per_sec", "wall_time")
HISTORY_COLUMNS = tuple(column for column in CSV_COLUMNS if column not in TIMING_COLUMNS)

# The authors' metrics.csv columns (their train.py) and the step metric each holds, as the mean over the
# epoch's applied steps. The names are theirs, kept so their plots and tables read our runs:
CSV_FROM_METRICS = {
  "avg_ce_loss": "loss",  # their criterion at w: our training loss (cross-entropy, with label smoothing)
  "avg_aace_loss": "aace_kl",  # KL(q || p), which they log as "the AACE loss" for every method
  "avg_aace_ce": "aace_ce",  # not theirs: the cross-entropy against q, what AACE-SAM differentiates
  "avg_grad_norm": "first_pass_grad_norm",  # their grad_norm: of the gradient the perturbation is built from
  "avg_perturbation": "perturbation_norm",  # their ew_norm: ||w_adv - w||
  "avg_param_norm": "param_norm",  # not theirs: ||w||, the scale of avg_perturbation
  "train_loss": "loss_at_w_adv",  # the loss of the pass whose gradient updates the weights (at w_adv)
  "train_acc": "accuracy",  # of the first pass
}
# The evaluations of the epoch's end, after the authors' naming: `val_*` is the dataset's test split (their
# "validation" set, on which they report), `holdout_*` the validation split that `config.validation_examples`
# holds out of the training split (NaN without one): the only one that may choose an epoch or a setting.
EVALUATION_COLUMNS = {"test": ("val_loss", "val_acc"), "validation": ("holdout_loss", "holdout_acc")}
# The step metrics that an epoch's row averages over its applied steps.
SUMMED_METRICS = tuple(CSV_FROM_METRICS.values())


def zero_totals() -> dict:
  """An epoch's running totals: sums over its applied steps, step counts, the last learning rate,
  and the number of consecutive skipped steps (which runs on across epochs)."""
  return {
    "sums": {name: np.float32(0) for name in SUMMED_METRICS},
    "applied": np.int32(0),
    "skipped": np.int32(0),
    "learning_rate": np.float32(np.nan),
    "skip_streak": np.int32(0),
  }


def add_step(totals: dict, metrics: dict) -> dict:
  """The totals after one more step; runs inside the jitted step."""
  applied = metrics["skipped_steps"] == 0
  return {
    "sums": {name: totals["sums"][name] + jnp.where(applied, metrics[name], 0.0) for name in SUMMED_METRICS},
    "applied": totals["applied"] + applied.astype(jnp.int32),
    "skipped": totals["skipped"] + (~applied).astype(jnp.int32),
    "learning_rate": metrics["learning_rate"],
    "skip_streak": jnp.where(applied, 0, totals["skip_streak"] + 1),
  }


@jax.jit
def reset_epoch_totals(totals: dict) -> dict:
  """Zero totals for a new epoch, keeping the skip streak."""
  zeros = jax.tree.map(jnp.zeros_like, totals)
  return {**zeros, "learning_rate": totals["learning_rate"] * jnp.nan, "skip_streak": totals["skip_streak"]}


def row(epoch: int, totals: dict, evaluations: dict, *, images_per_sec: float, wall_time: float) -> dict:
  """The epoch's CSV row: means over its applied steps, the last learning rate (as the authors log it),
  the evaluations (`{"test": (loss, accuracy), "validation": ...}`; NaN for a split not evaluated), and the
  timing."""
  totals = jax.device_get(totals)
  applied = int(totals["applied"])
  mean = {name: float(value) / applied if applied else float("nan") for name, value in totals["sums"].items()}
  evaluated = {}
  for split, columns in EVALUATION_COLUMNS.items():
    evaluated.update(zip(columns, evaluations.get(split, (float("nan"), float("nan")))))
  return {
    "epoch": epoch,
    "lr": float(totals["learning_rate"]),
    **{column: mean[metric] for column, metric in CSV_FROM_METRICS.items()},
    **evaluated,
    "skipped_steps": float(totals["skipped"]),
    "images_per_sec": images_per_sec,
    "wall_time": wall_time,
  }


# The plots a run draws after each epoch: file name -> (y label, columns).
PLOT_PANELS = {
  "loss": ("loss", ("avg_ce_loss", "avg_aace_loss", "avg_aace_ce", "train_loss", "val_loss", "holdout_loss")),
  "perturbation": ("norm", ("avg_grad_norm", "avg_perturbation")),
  "accuracy": ("accuracy", ("train_acc", "val_acc", "holdout_acc")),
}
