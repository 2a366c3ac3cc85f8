"""A run's workdir: its lock, config.json, metrics.csv, TensorBoard events and plots.

Only process 0 writes them. The CSV is a view of the rows that the newest
checkpoint holds (`train/checkpointing.py`): a resumed run rewrites it from
there, so a process killed between any two writes leaves nothing that a
rerun does not repair. Losing a TensorBoard event or a plot (a full disk,
say) is a warning, not a crash.
"""

import csv
import dataclasses
import fcntl
import io
import json
import math
import os
import shutil
import socket
import time
import warnings
from typing import BinaryIO
from typing import Callable
from typing import Optional
from typing import Union

import numpy as np

from train import epoch_row


class WorkdirBusy(RuntimeError):
  """Another live run holds the workdir."""


class RunFilesError(RuntimeError):
  """metrics.csv could not be written (the checkpoint holds its rows)."""


class WorkdirLock:
  """One run per workdir: an exclusive `flock` on `workdir/lock`, which names the holder's host and pid.

  The kernel holds the lock for the process and drops it when the process
  dies, however it dies: a lock file left by a killed run is simply locked
  again, and two runs can never both hold it. The file is removed on release
  while still locked; a process that locked a file since removed (or
  replaced) finds it no longer at the path and tries again.
  """

  def __init__(self, workdir: str, name: str = "lock"):
    self.path = os.path.join(workdir, name)
    self.holder = {"host": socket.gethostname(), "pid": os.getpid()}
    self.fd: Optional[int] = None

  @property
  def held(self) -> bool:
    return self.fd is not None

  def read(self) -> dict:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def acquire(self) -> None:
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        holder = self.read()
        raise WorkdirBusy(
          f"{os.path.dirname(self.path)} is in use by pid {holder.get('pid', '?')} on host"
          f" {holder.get('host', '?')} ({self.path}); wait for that run, or use another --workdir"
        ) from None
      except BaseException:
        os.close(fd)
        raise
      try:
        same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same_file = False
      if not same_file:  # its holder released (removed) it between our open and our lock
        os.close(fd)
        continue
      try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(self.holder).encode())
        os.fsync(fd)
      except BaseException:
        os.close(fd)
        raise
      self.fd = fd
      return

  def release(self) -> None:
    """Removes and unlocks the file; never raises (an error it met is the caller's to report, not this)."""
    if self.fd is None:
      return
    try:
      os.remove(self.path)
    except OSError:
      pass  # a file left behind is locked by no one: the next run takes it
    finally:
      os.close(self.fd)
      self.fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def write_config(config, workdir: str) -> None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    atomic_write(path, config.to_json_best_effort(indent=2, sort_keys=True))


def write_data_description(data, workdir: str) -> None:
  """data.json: where the data came from, the sizes of its splits and the label noise as realized.

  The same for every invocation of a run (the data is a function of the
  config), so a resumed run rewrites it whole.
  """
  noise = data.label_noise
  description = {
    "origin": data.origin,
    "training_examples": len(data.train),
    "validation_examples": None if data.validation is None else len(data.validation),
    "test_examples": len(data.eval),
    "label_noise": None if noise is None else dataclasses.asdict(noise),
  }
  atomic_write(os.path.join(workdir, "data.json"), json.dumps(description, indent=2) + "\n")


def atomic_write(path: str, contents: Union[str, Callable[[BinaryIO], None]]) -> None:
  """Writes `path` whole or not at all: a kill leaves the old file or the new one, and no partial file behind.

  `contents`: the text, or a function that writes the bytes to the file it is given.
  """
  aside = f"{path}.tmp-{os.getpid()}"
  try:
    with open(aside, "wb") as f:
      if isinstance(contents, str):
        f.write(contents.encode())
      else:
        contents(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(aside, path)
  except BaseException:
    if os.path.exists(aside):
      os.remove(aside)
    raise


def clear_run(workdir: str) -> None:
  """Removes a previous run's outputs (for --config.overwrite=True)."""
  for name in ("config.json", "data.json", "metrics.csv"):
    if os.path.exists(os.path.join(workdir, name)):
      os.remove(os.path.join(workdir, name))
  for name in ("checkpoints", "tensorboard", "plots"):
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)


def _number(text) -> float:
  try:
    return float(text)
  except (TypeError, ValueError):
    return float("nan")


class RunFiles:
  """metrics.csv, TensorBoard events and plots; a no-op on processes other than 0.

  The CSV and the events take every row as it comes. The plots are drawn
  again at most every `plot_interval_seconds` and when the files are closed:
  drawing them takes about half a second, as long as a short epoch's
  evaluation (`benchmarks/run_time.py`).
  """

  def __init__(self, workdir: str, enabled: bool, plot_interval_seconds: float = 60.0):
    self.enabled = enabled
    self.csv_path = os.path.join(workdir, "metrics.csv")
    self.plots_dir = os.path.join(workdir, "plots")
    self.rows: list[dict] = []
    self.plot_interval_seconds = plot_interval_seconds
    self.plotted_rows, self.plotted_at = 0, -math.inf
    self.writer = None
    if enabled:
      from tensorboardX import SummaryWriter

      os.makedirs(self.plots_dir, exist_ok=True)
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def read(self) -> list[dict]:
    """The CSV's rows as they are on disk, read leniently: only their timing matters (the checkpoint holds the
    rest).

    A file saved again by hand (a byte-order mark, another delimiter, extra or
    reordered columns) is read; a killed write's partial last line ends it;
    a value that is not a number is NaN. A file with no epoch column, or not
    text, cannot give any row: it is set aside under a new name, with a
    warning, and the resumed run rebuilds the CSV from its checkpoint.
    """
    if not os.path.exists(self.csv_path):
      return []
    try:
      with open(self.csv_path, newline="", encoding="utf-8-sig") as f:
        text = f.read()
      try:
        dialect = csv.Sniffer().sniff(text.split("\n", 1)[0], delimiters=",;\t")
      except csv.Error:
        dialect = csv.excel
      reader = csv.DictReader(io.StringIO(text), dialect=dialect)
      table = list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
      return self._set_aside(f"{type(error).__name__}: {error}")
    if text.strip() and "epoch" not in (reader.fieldnames or ()):
      return self._set_aside("it has no epoch column")
    rows = []
    for row in table:
      try:
        epoch = int(row["epoch"])
      except (TypeError, ValueError):
        break
      rows.append({"epoch": epoch, **{column: _number(row.get(column)) for column in epoch_row.CSV_COLUMNS[1:]}})
    return rows

  def _set_aside(self, why: str) -> list[dict]:
    if self.enabled:
      aside = f"{self.csv_path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
      os.replace(self.csv_path, aside)
      warnings.warn(
        f"{self.csv_path} cannot be read ({why}); kept as {aside}, rebuilt from the checkpoint",
        stacklevel=3,
      )
    return []

  def restore(self, rows: list[dict]) -> None:
    """Makes the CSV hold exactly `rows`, the epochs the resumed checkpoint covers."""
    self.rows = list(rows)
    if self.enabled and (self.rows or os.path.exists(self.csv_path)):
      atomic_write(self.csv_path, self._csv_text(self.rows))

  def append(self, row: dict) -> None:
    self.rows.append(row)
    if not self.enabled:
      return
    self.write_csv_row(row)
    self._optional("TensorBoard events", lambda: self.write_events(row))
    if time.monotonic() - self.plotted_at >= self.plot_interval_seconds:
      self._optional("plots", self.plot)

  def write_csv_row(self, row: dict) -> None:
    """Appends `row` to the CSV (with the header, in a new file) and syncs it to disk."""
    new_file = not os.path.exists(self.csv_path)
    with open(self.csv_path, "a", newline="") as f:
      f.write(self._csv_text([row], header=new_file))
      f.flush()
      os.fsync(f.fileno())

  @staticmethod
  def _csv_text(rows: list[dict], header: bool = True) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=epoch_row.CSV_COLUMNS)
    if header:
      writer.writeheader()
    writer.writerows({**row, "epoch": int(row["epoch"])} for row in rows)
    return text.getvalue()

  def write_events(self, row: dict) -> None:
    """Adds the row's values to the TensorBoard events, at the epoch's number counted from 1."""
    for name, value in row.items():
      if name != "epoch" and np.isfinite(value):  # NaN: a split this epoch did not evaluate
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

    self.plotted_rows, self.plotted_at = len(self.rows), time.monotonic()
    epochs = [row["epoch"] + 1 for row in self.rows]
    for name, (ylabel, columns) in epoch_row.PLOT_PANELS.items():
      fig, ax = plt.subplots(figsize=(6, 4))
      try:
        for column in columns:
          # Epochs whose split was not evaluated are NaN (holdout_* without a validation split; val_* between
          # test evaluations): each line joins the epochs that have a value.
          points = [(epoch, row[column]) for epoch, row in zip(epochs, self.rows) if np.isfinite(row[column])]
          if points:
            ax.plot(*zip(*points), label=column, marker="." if len(points) < 30 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self.plots_dir, f"{name}.png"), dpi=100)
      finally:
        plt.close(fig)

  def close(self):
    """Draws the plots of rows not plotted yet, and closes the events."""
    if self.enabled and self.rows and self.plotted_rows != len(self.rows):
      self._optional("plots", self.plot)
    if self.writer is not None:
      self._optional("TensorBoard events", self.writer.close)
