"""Checkpoints: the train state, the epoch's running totals and every finished epoch's row.

One orbax checkpoint holds all a resumed run needs to continue as if never
stopped: the `TrainState`, the running sums of the epoch in progress (so a
row finished after a mid-epoch resume equals the uninterrupted one) and the
rows of the finished epochs, in float64 (so the CSV is rebuilt exactly from
the newest checkpoint, whatever was lost after it). The rows leave out the
timing columns, so that an interrupted run's checkpoints equal an
uninterrupted run's bit for bit; a rebuilt row takes its timing from the CSV
where it is still there. Checkpoints are written
asynchronously; only a finite state is ever saved, and a restored one that is
not finite, unreadable or inconsistent is skipped for the previous one.
"""

import logging as logging_module
import os
import sys
import warnings
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

import aace_jax
from train.epoch_row import HISTORY_COLUMNS
from train.epoch_row import TIMING_COLUMNS


class CheckpointError(RuntimeError):
  """No checkpoint in the workdir can be read, or one could not be written."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written. Orbax's threads for later writes may then wait forever: a process
  that meets this error should end without waiting for them (`os._exit` after its message)."""


class _OrbaxWriteErrors(logging_module.Filter):
  """Drops the tracebacks that orbax logs from its writer threads (hundreds of lines for one full disk):
  `Checkpoints` raises every write error itself, as one `CheckpointWriteError`."""

  def filter(self, record: logging_module.LogRecord) -> bool:
    return not (record.levelno >= logging_module.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


logging.get_absl_logger().addFilter(_OrbaxWriteErrors())


def _drop_reports_of_abandoned_writes() -> None:
  """Once a background write fails, tensorstore's callbacks for the checkpoint's other files find orbax's event
  loop closed and report it as unraisable, a traceback per file, before the next save or wait raises the
  failure as one `CheckpointWriteError`; those reports are dropped (every other unraisable exception still
  reaches the previous hook)."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_event_loop", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_closed_event_loop = True
  sys.unraisablehook = hook


def empty_history(num_epochs: int) -> np.ndarray:
  """One row per epoch, NaN until the epoch is finished."""
  return np.full((num_epochs, len(HISTORY_COLUMNS)), np.nan)


def history_rows(history: np.ndarray, csv_rows: list[dict]) -> list[dict]:
  """The finished epochs' CSV rows: the checkpoint's values, with the timing of `csv_rows` (NaN where lost)."""
  timing = {int(row["epoch"]): row for row in csv_rows}
  rows = []
  for values in np.asarray(history):
    if np.isnan(values[0]):
      continue
    row = {column: float(value) for column, value in zip(HISTORY_COLUMNS, values)}
    row["epoch"] = int(row["epoch"])
    rows.append({**row, **{c: float(timing.get(row["epoch"], {}).get(c, np.nan)) for c in TIMING_COLUMNS}})
  return rows


def with_row(history: np.ndarray, row: dict) -> np.ndarray:
  history = np.array(history, copy=True)
  history[int(row["epoch"])] = [row[column] for column in HISTORY_COLUMNS]
  return history


def is_finite(tree) -> bool:
  """True when every floating-point array of `tree` is finite (checked on the host)."""
  return all(
    bool(np.all(np.isfinite(np.asarray(x))))
    for x in jax.tree.leaves(tree)
    if np.issubdtype(np.asarray(x).dtype, np.inexact)
  )


def first_unreadable(path: str) -> Optional[str]:
  """The first file or folder under `path` that this process may not open or list, or None."""
  try:
    if os.path.isdir(path):
      for name in sorted(os.listdir(path)):
        found = first_unreadable(os.path.join(path, name))
        if found is not None:
          return found
    else:
      with open(path, "rb"):
        pass
  except PermissionError:
    return path
  except FileNotFoundError:  # a missing file is damage, not a permission
    return None
  return None


def _to_tree(state: aace_jax.TrainState, totals: dict, history: np.ndarray) -> dict:
  return {**state._replace(rng=jax.random.key_data(state.rng))._asdict(), "epoch_totals": totals, "history": history}


# The history's columns in checkpoints written before the validation split's columns existed.
HISTORY_COLUMNS_WITHOUT_HOLDOUT = tuple(column for column in HISTORY_COLUMNS if not column.startswith("holdout_"))


def current_history(history: np.ndarray) -> np.ndarray:
  """`history` with the columns of `HISTORY_COLUMNS`: one of an older checkpoint gets NaN validation columns,
  so that a run started before they existed resumes (orbax restores an array in the shape it stored)."""
  history = np.asarray(history)
  if history.shape[1] != len(HISTORY_COLUMNS_WITHOUT_HOLDOUT):
    return history
  upgraded = np.full((len(history), len(HISTORY_COLUMNS)), np.nan)
  for index, column in enumerate(HISTORY_COLUMNS_WITHOUT_HOLDOUT):
    upgraded[:, HISTORY_COLUMNS.index(column)] = history[:, index]
  return upgraded


def _from_tree(tree: dict):
  fields = {name: tree[name] for name in aace_jax.TrainState._fields}
  state = aace_jax.TrainState(**{**fields, "rng": jax.random.wrap_key_data(fields["rng"])})
  return state, tree["epoch_totals"], current_history(tree["history"])


class Checkpoints:
  """The workdir's checkpoints, written in the background."""

  def __init__(self, directory: str, max_to_keep: int):
    self.manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    )
    self.directory = directory
    self.last_saved = max(self.manager.all_steps(), default=None)
    _drop_reports_of_abandoned_writes()

  def save(self, state: aace_jax.TrainState, totals: dict, history: np.ndarray) -> None:
    """Starts writing a checkpoint of a finite state; the loop goes on while it is written."""
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return
    try:
      self.manager.save(step, args=ocp.args.StandardSave(_to_tree(state, totals, history)))
    except Exception as error:  # orbax raises many types for a failed write (a full disk, say)
      raise self._write_error(step, error) from error
    self.last_saved = step

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as error:
      raise self._write_error(self.last_saved, error) from error

  def _write_error(self, step, error) -> CheckpointWriteError:
    saved = sorted(self.manager.all_steps())
    last = f"the last checkpoint written whole is step {saved[-1]}" if saved else "no checkpoint was written whole"
    cause = str(error).splitlines()[0] if str(error) else ""
    # A background write's error surfaces at the next save: it names its own step's folder, not `step`.
    return CheckpointWriteError(
      f"writing a checkpoint (at step {step} or before) in {self.directory} failed ({type(error).__name__}:"
      f" {cause}); {last}."
    )

  def close(self) -> None:
    self.manager.close()

  def restore_latest(self, state_shapes: aace_jax.TrainState, totals: dict, history: np.ndarray):
    """The newest readable, consistent and finite checkpoint as `(state, totals, history)`; None if there is none.

    `state_shapes` holds `jax.ShapeDtypeStruct`s with the shardings to restore
    into, `totals` and `history` are templates of the same kind. A damaged
    checkpoint is skipped with a warning and deleted once an older one is
    read, so the resumed run can write its step again; one that only cannot
    be read for its permissions is not damaged: nothing is deleted, and the
    run stops naming the path.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None

    def abstract(x):
      if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      return x

    rng = state_shapes.rng
    rng_data = jax.eval_shape(jax.random.key_data, rng)
    state_shapes = state_shapes._replace(
      rng=jax.ShapeDtypeStruct(rng_data.shape, rng_data.dtype, sharding=rng.sharding)
    )
    target = jax.tree.map(abstract, {**state_shapes._asdict(), "epoch_totals": totals, "history": history})
    failures = []
    for step in steps:
      try:
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
      except Exception as error:  # orbax raises many types for damaged files
        blocked = first_unreadable(os.path.join(self.directory, str(step)))
        if blocked is not None:  # not damage: nothing is set aside or deleted
          raise CheckpointError(
            f"the checkpoint of step {step} cannot be read: permission denied on {blocked}. It is kept, and so is"
            " every other; fix the permissions and rerun."
          ) from error
        failures.append(f"step {step}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
      else:
        if int(restored["step"]) != step:
          failures.append(f"step {step}: it holds step {int(restored['step'])}")
        elif not is_finite({k: v for k, v in restored.items() if k != "history"}):
          failures.append(f"step {step}: it holds NaN or infinite values")
        else:
          if failures:
            for damaged in (s for s in steps if s > step):
              self.manager.delete(damaged)
            warnings.warn(
              f"resumed from the checkpoint at step {step}: newer ones were unreadable and are deleted"
              f" ({'; '.join(failures)})",
              stacklevel=2,
            )
          self.last_saved = step
          return _from_tree(restored)
      logging.warning("checkpoint at step %d is unusable (%s); falling back to the previous one", step, failures[-1])
    raise CheckpointError(
      f"no readable checkpoint in {self.directory} ({'; '.join(failures)}); rerun with"
      " --config.overwrite=True to start over, or use a new --workdir."
    )
