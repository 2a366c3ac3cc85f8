"""A run's workdir: its lock, config.json, metrics.csv, TensorBoard events and plots.

Only process 0 writes them. The CSV is a view of the rows that the newest
checkpoint holds (`train/checkpointing.py`): a resumed run rewrites it from
there, so a process killed between any two writes leaves nothing that a
rerun does not repair. Losing a TensorBoard event or a plot (a full disk,
say) is a warning, not a crash.
"""

import csv
import io
import json
import os
import shutil
import socket
import warnings

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
  "skipped_steps",
  "images_per_sec",
  "wall_time",
)


class WorkdirBusy(RuntimeError):
  """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


class WorkdirLock:
  """One run per workdir: `workdir/lock` names the holder's host and pid.

  The lock file appears whole or not at all (written aside, then hard-linked
  into place, which fails if it exists). A lock whose pid is dead on this host
  is stale, left by a killed run, and is taken over.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "lock")
    self.holder = {"host": socket.gethostname(), "pid": os.getpid()}
    self.held = False

  def read(self) -> dict:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def acquire(self) -> None:
    aside = f"{self.path}.{self.holder['pid']}"
    with open(aside, "w") as f:
      json.dump(self.holder, f)
    try:
      for _ in range(2):
        try:
          os.link(aside, self.path)
          self.held = True
          return
        except FileExistsError:
          holder = self.read()
          if holder.get("host") == self.holder["host"] and not _pid_alive(int(holder.get("pid", -1))):
            os.remove(self.path)  # stale: its run was killed
            continue
          raise WorkdirBusy(
            f"{os.path.dirname(self.path)} is in use by pid {holder.get('pid', '?')} on host"
            f" {holder.get('host', '?')} ({self.path}); wait for that run, or use another --workdir"
          ) from None
      raise WorkdirBusy(f"could not take {self.path}")
    finally:
      os.remove(aside)

  def release(self) -> None:
    if self.held and self.read() == self.holder:
      os.remove(self.path)
    self.held = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def write_config(config, workdir: str) -> None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    atomic_write(path, config.to_json_best_effort(indent=2, sort_keys=True))


def atomic_write(path: str, text: str) -> None:
  """Writes `path` whole or not at all: a kill leaves the old file or the new one."""
  aside = f"{path}.tmp-{os.getpid()}"
  with open(aside, "w", newline="") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(aside, path)


def clear_run(workdir: str) -> None:
  """Removes a previous run's outputs (for --config.overwrite=True)."""
  for name in ("config.json", "metrics.csv"):
    if os.path.exists(os.path.join(workdir, name)):
      os.remove(os.path.join(workdir, name))
  for name in ("checkpoints", "tensorboard", "plots"):
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)


class RunFiles:
  """metrics.csv, TensorBoard events and plots; a no-op on processes other than 0."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.csv_path = os.path.join(workdir, "metrics.csv")
    self.plots_dir = os.path.join(workdir, "plots")
    self.rows: list[dict] = []
    self.writer = None
    if enabled:
      from tensorboardX import SummaryWriter

      os.makedirs(self.plots_dir, exist_ok=True)
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def read(self) -> list[dict]:
    """The CSV's rows as they are on disk (a killed write may have left a partial last line)."""
    if not os.path.exists(self.csv_path):
      return []
    rows = []
    with open(self.csv_path, newline="") as f:
      for row in csv.DictReader(f):
        try:
          rows.append({k: int(v) if k == "epoch" else float(v) for k, v in row.items()})
        except (TypeError, ValueError):
          break
    return rows

  def restore(self, rows: list[dict]) -> None:
    """Makes the CSV hold exactly `rows`, the epochs the resumed checkpoint covers."""
    self.rows = list(rows)
    if self.enabled and (self.rows or os.path.exists(self.csv_path)):
      atomic_write(self.csv_path, self._csv_text(self.rows))

  def append(self, row: dict) -> None:
    self.rows.append(row)
    if not self.enabled:
      return
    new_file = not os.path.exists(self.csv_path)
    with open(self.csv_path, "a", newline="") as f:
      f.write(self._csv_text([row], header=new_file))
      f.flush()
      os.fsync(f.fileno())
    self._optional("TensorBoard events", lambda: self._add_scalars(row))
    self._optional("plots", self.plot)

  @staticmethod
  def _csv_text(rows: list[dict], header: bool = True) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
    if header:
      writer.writeheader()
    writer.writerows({**row, "epoch": int(row["epoch"])} for row in rows)
    return text.getvalue()

  def _add_scalars(self, row: dict) -> None:
    for name, value in row.items():
      if name != "epoch":
        self.writer.add_scalar(name, value, int(row["epoch"]) + 1)
    self.writer.flush()

  @staticmethod
  def _optional(what: str, write) -> None:
    try:
      write()
    except OSError as error:
      warnings.warn(f"could not write the {what} ({error}); training goes on", stacklevel=2)

  def plot(self) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] + 1 for row in self.rows]
    panels = {
      "loss": ("loss", ("avg_ce_loss", "avg_aace_loss", "avg_aace_ce", "train_loss", "val_loss")),
      "perturbation": ("norm", ("avg_grad_norm", "avg_perturbation")),
      "accuracy": ("accuracy", ("train_acc", "val_acc")),
    }
    for name, (ylabel, columns) in panels.items():
      fig, ax = plt.subplots(figsize=(6, 4))
      try:
        for column in columns:
          ax.plot(epochs, [row[column] for row in self.rows], label=column, marker="." if len(self.rows) < 30 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self.plots_dir, f"{name}.png"), dpi=100)
      finally:
        plt.close(fig)

  def close(self):
    if self.writer is not None:
      self._optional("TensorBoard events", self.writer.close)
