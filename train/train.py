"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

Reads top to bottom: configuration checks, the optimizer and schedule, the
state, the run's files (CSV, TensorBoard, plots, checkpoints), then the loop.
The step is `aace_jax.make_train_step`, run over a data mesh of every device
with `aace_jax.shard_train_step`, inside one jitted function that also
augments and normalizes the batch (`train/augment.py`): the host only gathers
stored images and labels and transfers them a few steps ahead, or, with
`data_on_device`, sends nothing at all. Checkpoints are written asynchronously.
"""

import collections
import csv
import dataclasses
import itertools
import functools
import json
import os
import shutil
import signal
import time
import warnings
from typing import Any, Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import aace_jax
from train import augment
from train import input_pipeline
from train import models

OPTIMIZERS = ("sgd", "sam", "aace_sam", "asam")
DEFAULT_RHO = {"aace_sam": 0.2, "sam": 0.05, "asam": 0.5, "sgd": 0.0}
CSV_COLUMNS = (
    "epoch", "lr", "avg_ce_loss", "avg_aace_loss", "avg_grad_norm", "avg_perturbation",
    "train_loss", "train_acc", "val_loss", "val_acc", "skipped_steps", "images_per_sec", "wall_time",
)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
  """A configuration that cannot run; raised before anything is written."""


def check_config(config: ml_collections.ConfigDict, device_count: Optional[int] = -1) -> None:
  """Raises `ConfigError` naming the first bad field.

  Batch sizes are checked against `device_count` (default: this machine's
  devices; None skips that check, for a command checked on another machine).
  """
  if device_count == -1:
    device_count = jax.device_count()
  checks = [
      (config.optimizer in OPTIMIZERS, f"optimizer {config.optimizer!r} is not one of {OPTIMIZERS}"),
      (config.dataset in input_pipeline.DATASETS, f"dataset {config.dataset!r} is not one of {sorted(input_pipeline.DATASETS)}"),
      (config.model in models.MODELS, f"model {config.model!r} is not one of {sorted(models.MODELS)}"),
      (config.dtype in DTYPES, f"dtype {config.dtype!r} is not one of {sorted(DTYPES)}"),
      (config.rho is None or config.rho >= 0, f"rho must be >= 0, got {config.rho}"),
      (config.aace_mode in aace_jax.AACE_MODES, f"aace_mode {config.aace_mode!r} is not one of {aace_jax.AACE_MODES}"),
      (0 <= config.aace_threshold <= 1, f"aace_threshold must lie in [0, 1], got {config.aace_threshold}"),
      (0 <= config.label_smoothing < 1, f"label_smoothing must lie in [0, 1), got {config.label_smoothing}"),
      (config.num_epochs >= 1, f"num_epochs must be >= 1, got {config.num_epochs}"),
      (config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}"),
      (config.learning_rate > 0, f"learning_rate must be > 0, got {config.learning_rate}"),
      (config.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {config.grad_accum_steps}"),
      (config.max_consecutive_skips >= 1, f"max_consecutive_skips must be >= 1, got {config.max_consecutive_skips}"),
      (config.max_in_memory_gb > 0, f"max_in_memory_gb must be > 0, got {config.max_in_memory_gb}"),
  ]
  if device_count is not None:
    checks += [
        (
            config.batch_size % device_count == 0,
            f"batch_size {config.batch_size} is not divisible by the {device_count} devices",
        ),
        (
            config.eval_batch_size % device_count == 0,
            f"eval_batch_size {config.eval_batch_size} is not divisible by the {device_count} devices",
        ),
        (
            (config.batch_size // device_count) % config.grad_accum_steps == 0,
            f"the per-device batch {config.batch_size // device_count} does not split into"
            f" grad_accum_steps={config.grad_accum_steps} micro-batches",
        ),
    ]
  for ok, message in checks:
    if not ok:
      raise ConfigError(f"Bad config: {message}.")


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """The authors' step schedule: lr x lr_decay at each milestone fraction of the epochs.

  Their loop sets the rate for epoch e after each step (`scheduler(epoch)`
  follows `optimizer.step()`), so a new rate takes effect from the second step
  of its first epoch; the boundaries below reproduce that exactly.
  """
  boundaries = {}
  for fraction in config.lr_milestones:
    first_epoch = int(np.ceil(fraction * config.num_epochs))
    boundaries[first_epoch * steps_per_epoch + 1] = config.lr_decay
  return optax.piecewise_constant_schedule(config.learning_rate, boundaries)


def create_optimizer(config, steps_per_epoch: int):
  """Returns `(tx, perturbation_loss, loss)` for `config.optimizer`."""
  base = optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.inject_hyperparams(optax.sgd)(
          learning_rate=learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum
      ),
  )
  rho = DEFAULT_RHO[config.optimizer] if config.rho is None else config.rho
  aace = functools.partial(aace_jax.aace_cross_entropy, threshold=config.aace_threshold, mode=config.aace_mode)
  loss = functools.partial(aace_jax.cross_entropy, label_smoothing=config.label_smoothing)
  normalize = {} if config.normalize is None else {"normalize": config.normalize}
  if config.optimizer == "sgd":
    return base, aace, loss
  if config.optimizer == "aace_sam":
    return aace_jax.aace_sam(base, rho, **normalize), aace, loss
  adaptive = config.optimizer == "asam"
  return aace_jax.sam(base, rho, adaptive=adaptive, **normalize), loss, loss


def state_to_checkpoint(state: aace_jax.TrainState) -> dict:
  return state._replace(rng=jax.random.key_data(state.rng))._asdict()


def state_from_checkpoint(tree: dict) -> aace_jax.TrainState:
  return aace_jax.TrainState(**{**tree, "rng": jax.random.wrap_key_data(tree["rng"])})


@dataclasses.dataclass
class RunFiles:
  """The workdir's outputs; only process 0 writes them."""

  workdir: str
  enabled: bool

  def __post_init__(self):
    self.csv_path = os.path.join(self.workdir, "metrics.csv")
    self.plots_dir = os.path.join(self.workdir, "plots")
    self.writer = None
    if self.enabled:
      from tensorboardX import SummaryWriter

      os.makedirs(self.plots_dir, exist_ok=True)
      self.writer = SummaryWriter(os.path.join(self.workdir, "tensorboard"))

  def rows(self) -> list[dict]:
    if not os.path.exists(self.csv_path):
      return []
    with open(self.csv_path, newline="") as f:
      return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]

  def keep_epochs_before(self, epoch: int) -> list[dict]:
    """Drops rows of epochs a checkpoint does not cover (a crash after the CSV write)."""
    rows = [row for row in self.rows() if row["epoch"] < epoch]
    if self.enabled and os.path.exists(self.csv_path):
      self._write(rows)
    return rows

  def _write(self, rows):
    with open(self.csv_path, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
      writer.writeheader()
      writer.writerows(rows)

  def append(self, row: dict) -> None:
    if not self.enabled:
      return
    new_file = not os.path.exists(self.csv_path)
    with open(self.csv_path, "a", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
      if new_file:
        writer.writeheader()
      writer.writerow(row)
    for name, value in row.items():
      if name != "epoch":
        self.writer.add_scalar(name, value, int(row["epoch"]) + 1)
    self.writer.flush()
    self.plot(self.rows())

  def plot(self, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] + 1 for row in rows]
    panels = {
        "loss": ("loss", ("avg_ce_loss", "avg_aace_loss", "train_loss", "val_loss")),
        "perturbation": ("norm", ("avg_grad_norm", "avg_perturbation")),
        "accuracy": ("accuracy", ("train_acc", "val_acc")),
    }
    for name, (ylabel, columns) in panels.items():
      fig, ax = plt.subplots(figsize=(6, 4))
      for column in columns:
        ax.plot(epochs, [row[column] for row in rows], label=column, marker="." if len(rows) < 30 else None)
      ax.set_xlabel("epoch")
      ax.set_ylabel(ylabel)
      ax.grid(alpha=0.3)
      ax.legend()
      fig.tight_layout()
      fig.savefig(os.path.join(self.plots_dir, f"{name}.png"), dpi=100)
      plt.close(fig)

  def close(self):
    if self.writer is not None:
      self.writer.close()


def default_compilation_cache_dir() -> str:
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache_home, "aace_jax", "xla")


# jax.monitoring events of the persistent compilation cache, counted since it was enabled
# ("listening" is 1 once the listener is registered).
compilation_cache_events = collections.Counter()


def _count_cache_event(event: str, **kwargs) -> None:
  del kwargs
  if event in ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"):
    compilation_cache_events[event.rsplit("/", 1)[1]] += 1


def enable_compilation_cache(config) -> Optional[str]:
  """Turns on jax's persistent compilation cache: a resumed or repeated run loads its compiled steps.

  Call it before anything compiles. Returns the cache directory, or None when
  `config.compilation_cache` is off.
  """
  if not config.compilation_cache:
    return None
  path = config.compilation_cache_dir or default_compilation_cache_dir()
  jax.config.update("jax_compilation_cache_dir", path)
  # Every program, however quick to compile: a resumed run then compiles nothing.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if not compilation_cache_events["listening"]:
    jax.monitoring.register_event_listener(_count_cache_event)
    compilation_cache_events["listening"] = 1
  return path


# Fields that may change between an interrupted run and its resumption: they
# change where the data lives and how often the run reports, not what it computes.
RESUMABLE_CHANGES = {
    "halt_after_epochs", "log_every_steps", "overwrite",
    "data_on_device", "max_in_memory_gb", "cache_decoded", "decoded_cache_dir",
    "compilation_cache", "compilation_cache_dir",
}


def check_resumable(config, workdir: str) -> None:
  """Refuses a workdir whose config.json holds another recipe."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  current = json.loads(config.to_json_best_effort())
  differ = sorted(k for k in set(saved) | set(current) if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
  if differ:
    raise ConfigError(
        f"Bad config: {workdir} holds a run with another config (fields {', '.join(differ)} differ);"
        " use a new --workdir."
    )


def write_config(config, workdir: str) -> None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    with open(path, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def epoch_summary(step_metrics: list[dict]) -> dict:
  """Means over an epoch's applied steps; the learning rate's last value (as the authors log
  it); the number of skipped steps. Fetched from the devices once per epoch.
  """
  stacked = jax.device_get({k: jnp.stack([m[k] for m in step_metrics]) for k in step_metrics[0]})
  applied = stacked["skipped_steps"] == 0
  summary = {k: float(np.mean(v[applied])) if applied.any() else float("nan") for k, v in stacked.items()}
  summary["learning_rate"] = float(stacked["learning_rate"][-1])
  summary["skipped_steps"] = float(np.sum(stacked["skipped_steps"]))
  return summary


def evaluate(eval_step, state, batches: Iterator[dict]) -> tuple[float, float]:
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  for batch in batches:
    sums = jax.device_get(eval_step(state, batch))
    for k in totals:
      totals[k] += float(sums[k])
  return totals["loss_sum"] / totals["count"], totals["correct"] / totals["count"]


class TrainingStopped(RuntimeError):
  """Training cannot go on (non-finite gradients); the last good state is checkpointed."""


class CheckpointError(RuntimeError):
  """No checkpoint in the workdir can be read."""


def restore_latest(checkpoints: ocp.CheckpointManager, state: aace_jax.TrainState) -> aace_jax.TrainState:
  """The newest readable checkpoint; a damaged one is skipped with a warning."""
  steps = sorted(checkpoints.all_steps(), reverse=True)
  if not steps:
    return state
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state_to_checkpoint(state))
  failures = []
  for step in steps:
    try:
      restored = checkpoints.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as error:  # orbax raises many types for damaged files
      failures.append(f"step {step}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
      logging.warning("checkpoint at step %d is unreadable (%s); falling back to the previous one", step, failures[-1])
      continue
    if int(restored["step"]) != step:
      failures.append(f"step {step}: it holds step {int(restored['step'])}")
      logging.warning("checkpoint at step %d is inconsistent; falling back to the previous one", step)
      continue
    if failures:
      # Deleted so that the resumed run can write those steps again.
      for damaged in (s for s in steps if s > step):
        checkpoints.delete(damaged)
      warnings.warn(
          f"resumed from the checkpoint at step {step}: newer ones were unreadable and are deleted"
          f" ({'; '.join(failures)})"
      )
    return state_from_checkpoint(restored)
  raise CheckpointError(
      f"no readable checkpoint in {checkpoints.directory} ({'; '.join(failures)}); rerun with"
      " --config.overwrite=True to start over, or use a new --workdir."
  )


class StopSignals:
  """Turns SIGTERM and SIGINT into a request to stop after the current step."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def any_host_received(self) -> bool:
    if jax.process_count() == 1:
      return self.received is not None
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array(self.received is not None))))


def clear_run(workdir: str) -> None:
  """Removes a previous run's outputs (for --config.overwrite=True)."""
  for name in ("config.json", "metrics.csv"):
    if os.path.exists(os.path.join(workdir, name)):
      os.remove(os.path.join(workdir, name))
  for name in ("checkpoints", "tensorboard", "plots"):
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)


def prefetch_to_device(batches: Iterator[dict], transfer: Callable, size: int = 2) -> Iterator[dict]:
  """Transfers batches `size` steps ahead of the one being consumed.

  Dispatch is asynchronous, so while the device runs a step the host gathers
  and sends the next batches: the transfer hides behind the compute.
  """
  queue = collections.deque()
  for batch in batches:
    queue.append(transfer(batch))
    if len(queue) > size:
      yield queue.popleft()
  yield from queue


class DeviceSplit(NamedTuple):
  """The train split on the devices (replicated) and the current epoch's order of its records."""

  images: jax.Array
  labels: jax.Array
  order: jax.Array


def make_device_steps(train_step, eval_step, data: input_pipeline.Data, *, seed: int, batch_sharding: NamedSharding):
  """The trainer's jitted steps: stored images in, augmentation and normalization on the device.

  Each example's augmentation is drawn from (seed, epoch, its position in the
  epoch), all read from the step counter, so the draws do not depend on how
  the batch is split over hosts and devices, and a resumed run repeats them.

  Returns:
    ``(host_fed_step, resident_step, eval_step)``: ``host_fed_step(state,
    {"image", "label"})`` takes a global batch of stored images;
    ``resident_step(state, DeviceSplit)`` gathers the step's batch from a split
    held on the devices; ``eval_step(state, {"image", "label", "mask"})``
    normalizes and evaluates.
  """
  steps_per_epoch, global_batch, spec = data.steps_per_epoch, data.global_batch, data.spec

  def epoch_and_positions(step):
    epoch, index = jnp.divmod(step, steps_per_epoch)
    return epoch, index * global_batch + jnp.arange(global_batch)

  def augmented_step(state, images, labels):
    epoch, positions = epoch_and_positions(state.step)
    images = augment.augment_batch(
        images, seed=seed, epoch=epoch, positions=positions, kind=spec.augment, mean=data.mean, std=data.std
    )
    batch = {"image": jax.lax.with_sharding_constraint(images, batch_sharding), "label": labels}
    return train_step(state, batch)

  def resident_step(state, split: DeviceSplit):
    _, positions = epoch_and_positions(state.step)
    rows = jax.lax.with_sharding_constraint(split.order[positions], batch_sharding)
    return augmented_step(state, split.images[rows], split.labels[rows])

  def normalized_eval_step(state, batch):
    return eval_step(state, {**batch, "image": augment.normalize(batch["image"], data.mean, data.std)})

  return (
      jax.jit(lambda state, batch: augmented_step(state, batch["image"], batch["label"]), donate_argnums=0),
      jax.jit(resident_step, donate_argnums=0),
      jax.jit(normalized_eval_step),
  )


class Experiment(NamedTuple):
  """What a run needs, built from the config before anything is written.

  Attributes:
    train_step: ``(state, batch) -> (state, metrics)``, compiled.
    train_batches: ``(epoch, start_step) ->`` the batches to give `train_step`, on the devices.
    eval_step, eval_batches: likewise for evaluation (``eval_batches()``).
  """

  data: input_pipeline.Data
  state: aace_jax.TrainState
  train_step: Callable
  train_batches: Callable[[int, int], Iterator]
  eval_step: Callable
  eval_batches: Callable[[], Iterator]


def decoded_cache_dir(config) -> Optional[str]:
  if not config.cache_decoded or config.dataset == "digits":
    return None
  return config.decoded_cache_dir or os.path.join(input_pipeline.resolve_data_dir(config.data_dir), "decoded")


def create_experiment(config: ml_collections.ConfigDict, data: Optional[input_pipeline.Data] = None) -> Experiment:
  """Opens the data (unless given), builds the model, optimizer and jitted steps over a mesh of every device."""
  if data is None:
    data = input_pipeline.create_data(
        config.dataset,
        global_batch=config.batch_size,
        global_eval_batch=config.eval_batch_size,
        seed=config.seed,
        data_dir=config.data_dir,
        cache_dir=decoded_cache_dir(config),
        max_in_memory_bytes=config.max_in_memory_gb * 2**30,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
  if config.data_on_device and not data.in_memory:
    raise ConfigError(
        f"Bad config: data_on_device needs the splits in memory, but {config.dataset!r} is larger than"
        f" max_in_memory_gb={config.max_in_memory_gb}."
    )
  tx, perturbation_loss, loss = create_optimizer(config, data.steps_per_epoch)
  model = models.create_model(config.model, data.spec.num_classes, DTYPES[config.dtype])
  apply_fn = aace_jax.linen_apply_fn(model)

  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch_sharding = NamedSharding(mesh, P("data"))
  train_step = aace_jax.shard_train_step(
      aace_jax.make_train_step(
          apply_fn, tx, perturbation_loss=perturbation_loss, loss=loss, axis_name="data",
          sync_perturbation=config.sync_perturbation, grad_accum_steps=config.grad_accum_steps,
      ),
      mesh,
  )
  eval_step = aace_jax.shard_train_step(aace_jax.make_eval_step(apply_fn, loss=loss, axis_name="data"), mesh)
  host_fed_step, resident_step, eval_step = make_device_steps(
      train_step, eval_step, data, seed=config.seed, batch_sharding=batch_sharding
  )

  def to_global(batch):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x), batch)

  if config.data_on_device:
    images, labels = aace_jax.replicate_on_mesh((data.train.images, data.train.labels), mesh)

    def train_batches(epoch, start_step):
      split = DeviceSplit(images, labels, aace_jax.replicate_on_mesh(data.epoch_order(epoch), mesh))
      return itertools.repeat(split, data.steps_per_epoch - start_step)

    train_step = resident_step
  else:

    def train_batches(epoch, start_step):
      return prefetch_to_device(data.train_batches(epoch, start_step), to_global)

    train_step = host_fed_step

  init_key, state_key = jax.random.split(jax.random.key(config.seed))
  variables = models.init_variables(model, init_key, data.spec.image_shape)
  params = variables.pop("params")
  state = aace_jax.TrainState.create(params=params, model_state=dict(variables), tx=tx, rng=state_key)
  return Experiment(
      data=data,
      state=aace_jax.replicate_on_mesh(state, mesh),
      train_step=train_step,
      train_batches=train_batches,
      eval_step=eval_step,
      eval_batches=lambda: prefetch_to_device(data.eval_batches(), to_global),
  )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, data: Optional[input_pipeline.Data] = None
) -> dict[str, Any]:
  """Trains `config.model` on `config.dataset` with `config.optimizer` and evaluates each epoch.

  Resumes from the newest readable checkpoint in `workdir/checkpoints`. Stops
  early, resumably, after `config.halt_after_epochs` epochs or on SIGTERM/SIGINT
  (after the current step, with a checkpoint).

  Args:
    config: the run's config (see `train/configs/default.py`).
    workdir: where outputs and checkpoints go.
    data: already opened data to train on instead of `config.dataset` (benchmarks).

  Returns:
    The last finished epoch's CSV row plus `workdir`, `finished` and `stopped_by`.
  """
  invocation_start = time.time()
  check_config(config)
  if not config.overwrite:
    check_resumable(config, workdir)
  is_writer = jax.process_index() == 0
  experiment = create_experiment(config, data)
  data, state, train_step = experiment.data, experiment.state, experiment.train_step
  steps_per_epoch = data.steps_per_epoch

  # Everything that can be wrong with the inputs is known by now: write.
  os.makedirs(workdir, exist_ok=True)
  if is_writer:
    if config.overwrite:
      clear_run(workdir)
    write_config(config, workdir)
  files = RunFiles(workdir, enabled=is_writer)
  checkpoints = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint_max_to_keep, create=True),
  )

  def save(state):
    """Starts writing a checkpoint; the loop goes on while orbax writes it in the background."""
    step = int(jax.device_get(state.step))
    if step not in checkpoints.all_steps():
      checkpoints.save(step, args=ocp.args.StandardSave(state_to_checkpoint(state)))

  state = restore_latest(checkpoints, state)
  start_step = int(jax.device_get(state.step))
  start_epoch = start_step // steps_per_epoch
  rows = files.keep_epochs_before(start_epoch)
  wall_offset = rows[-1]["wall_time"] if rows else 0.0
  run_start = time.time()
  last_row = rows[-1] if rows else None
  stopped_by = None
  skip_streak = 0
  first_step_seconds = None

  from tqdm.auto import tqdm

  halt_at = None if config.halt_after_epochs is None else start_epoch + config.halt_after_epochs
  try:
    with StopSignals() as signals:
      for epoch in range(start_epoch, config.num_epochs):
        if halt_at is not None and epoch >= halt_at:
          stopped_by = "halt_after_epochs"
          break
        first = start_step - epoch * steps_per_epoch if epoch == start_epoch else 0
        bar = tqdm(
            total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{config.num_epochs}",
            disable=not is_writer, leave=False, dynamic_ncols=True,
        )
        epoch_start = time.time()
        step_metrics, checked = [], 0
        for index, batch in enumerate(experiment.train_batches(epoch, first), start=first):
          state, metrics = train_step(state, batch)
          step_metrics.append(metrics)
          if first_step_seconds is None:
            jax.block_until_ready(metrics)
            first_step_seconds = time.time() - invocation_start
            if is_writer:
              cache = dict(compilation_cache_events)
              tqdm.write(
                  f"first step after {first_step_seconds:.1f} s (start, data, init, compile and the step;"
                  f" compilation cache: {cache.get('cache_hits', 0)} hits, {cache.get('cache_misses', 0)} misses)"
              )
          bar.update(1)
          at_log_point = (index + 1) % config.log_every_steps == 0 or index + 1 == steps_per_epoch
          if at_log_point:
            latest = jax.device_get(metrics)
            bar.set_postfix(loss=f"{latest['loss']:.3f}", acc=f"{latest['accuracy']:.3f}", lr=f"{latest['learning_rate']:.4g}")
            for skipped in jax.device_get([m["skipped_steps"] for m in step_metrics[checked:]]):
              skip_streak = skip_streak + 1 if skipped else 0
            checked = len(step_metrics)
            if skip_streak >= config.max_consecutive_skips:
              save(state)  # skipped steps leave the state as it was: this is the last good one
              raise TrainingStopped(
                  f"stopped: the last {skip_streak} steps had non-finite gradients and were skipped (step"
                  f" {int(jax.device_get(state.step))}); the last good state is checkpointed in {workdir}."
              )
          # Several hosts must stop at the same step, so they compare signals at log points only.
          if (jax.process_count() == 1 or at_log_point) and signals.any_host_received():
            stopped_by = signals.received or "signal on another host"
            break
        bar.close()
        if stopped_by is not None:
          save(state)
          break
        last_row = finish_epoch(
            epoch, step_metrics, time.time() - epoch_start, state, experiment, config,
            wall_time=lambda: wall_offset + time.time() - run_start,
        )
        save(state)
        files.append(last_row)
        if is_writer:
          tqdm.write(
              f"epoch {epoch + 1}/{config.num_epochs}: train loss {last_row['train_loss']:.4f}"
              f" acc {last_row['train_acc']:.4f} | val loss {last_row['val_loss']:.4f} acc {last_row['val_acc']:.4f}"
              f" | lr {last_row['lr']:.4g} | {last_row['images_per_sec']:.0f} img/s"
          )
  finally:
    checkpoints.wait_until_finished()  # a stop or an error still leaves the last checkpoint whole
    checkpoints.close()
    files.close()
  finished = stopped_by is None and last_row is not None and last_row["epoch"] == config.num_epochs - 1
  return {
      **(last_row or {}),
      "workdir": workdir,
      "finished": finished,
      "stopped_by": stopped_by,
      "step": int(jax.device_get(state.step)),
      "first_step_seconds": first_step_seconds,
  }


def finish_epoch(epoch, step_metrics, seconds, state, experiment, config, *, wall_time) -> dict:
  """The epoch's CSV row: training means, evaluation, throughput; `wall_time()` read after evaluation."""
  summary = epoch_summary(step_metrics)
  val_loss, val_acc = evaluate(experiment.eval_step, state, experiment.eval_batches())
  return {
      "epoch": epoch,
      "lr": summary["learning_rate"],
      "avg_ce_loss": summary["ce_loss"],
      "avg_aace_loss": summary["perturbation_loss"],
      "avg_grad_norm": summary["perturbation_grad_norm"],
      "avg_perturbation": summary["perturbation_norm"],
      "train_loss": summary["loss"],
      "train_acc": summary["accuracy"],
      "val_loss": val_loss,
      "val_acc": val_acc,
      "skipped_steps": summary["skipped_steps"],
      "images_per_sec": len(step_metrics) * config.batch_size / seconds,
      "wall_time": wall_time(),
  }
