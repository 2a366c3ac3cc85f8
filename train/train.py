"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

Reads top to bottom: configuration checks, the optimizer and schedule, the
compilation cache, the device-side steps and the epoch's running totals, the
experiment (data, model, jitted steps), then the loop. The step is
`aace_jax.make_train_step`, run over a data mesh of every device with
`aace_jax.shard_step`, inside one jitted function that also augments
and normalizes the batch (`train/augment.py`) and adds the step's metrics to
the epoch's totals: the host only gathers stored images and labels and
transfers them a few steps ahead, or, with `data_on_device`, sends nothing at
all. The workdir's files are in `train/workdir.py`, checkpoints in
`train/checkpointing.py`.
"""

import collections
import functools
import itertools
import json
import math
import os
import signal
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import aace_jax
from train import augment
from train import checkpointing
from train import input_pipeline
from train import models
from train import workdir as workdir_files
from train.checkpointing import CheckpointError  # noqa: F401 (raised through here; main catches it)
from train.workdir import CSV_COLUMNS  # noqa: F401 (the CSV's columns, for readers of the trainer)
from train.workdir import WorkdirBusy  # noqa: F401

OPTIMIZERS = ("sgd", "sam", "aace_sam", "asam")
DEFAULT_RHO = {"aace_sam": 0.2, "sam": 0.05, "asam": 0.5, "sgd": 0.0}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
  """A configuration that cannot run; raised before anything is written."""


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _at_least(value, low) -> bool:
  return _is_number(value) and value >= low


def check_config(config: ml_collections.ConfigDict, device_count: Optional[int] = -1) -> None:
  """Raises `ConfigError` naming the first bad field and its value.

  Batch sizes are checked against `device_count` (default: this machine's
  devices; None skips that check, for a command checked on another machine).
  """
  if device_count == -1:
    device_count = jax.device_count()
  checks = [
      (config.optimizer in OPTIMIZERS, f"optimizer {config.optimizer!r} is not one of {OPTIMIZERS}"),
      (config.dataset in input_pipeline.DATASETS,
       f"dataset {config.dataset!r} is not one of {sorted(input_pipeline.DATASETS)}"),
      (config.model in models.MODELS, f"model {config.model!r} is not one of {sorted(models.MODELS)}"),
      (config.dtype in DTYPES, f"dtype {config.dtype!r} is not one of {sorted(DTYPES)}"),
      (config.rho is None or _at_least(config.rho, 0), f"rho must be >= 0, got {config.rho}"),
      (config.aace_mode in aace_jax.AACE_MODES, f"aace_mode {config.aace_mode!r} is not one of {aace_jax.AACE_MODES}"),
      (_at_least(config.aace_threshold, 0) and config.aace_threshold <= 1,
       f"aace_threshold must lie in [0, 1], got {config.aace_threshold}"),
      (_at_least(config.label_smoothing, 0) and config.label_smoothing < 1,
       f"label_smoothing must lie in [0, 1), got {config.label_smoothing}"),
      (_at_least(config.num_epochs, 1), f"num_epochs must be >= 1, got {config.num_epochs}"),
      (_at_least(config.batch_size, 1), f"batch_size must be >= 1, got {config.batch_size}"),
      (_at_least(config.eval_batch_size, 1), f"eval_batch_size must be >= 1, got {config.eval_batch_size}"),
      (_is_number(config.learning_rate) and config.learning_rate > 0,
       f"learning_rate must be a finite number > 0, got {config.learning_rate}"),
      (_at_least(config.momentum, 0) and config.momentum < 1, f"momentum must lie in [0, 1), got {config.momentum}"),
      (_at_least(config.weight_decay, 0), f"weight_decay must be a finite number >= 0, got {config.weight_decay}"),
      (_is_number(config.lr_decay) and config.lr_decay > 0, f"lr_decay must be a finite number > 0, got {config.lr_decay}"),
      (all(_is_number(f) and 0 < f <= 1 for f in config.lr_milestones),
       f"lr_milestones must be fractions of training in (0, 1], got {tuple(config.lr_milestones)}"),
      (_at_least(config.grad_accum_steps, 1), f"grad_accum_steps must be >= 1, got {config.grad_accum_steps}"),
      (_at_least(config.max_consecutive_skips, 1),
       f"max_consecutive_skips must be >= 1, got {config.max_consecutive_skips}"),
      (_is_number(config.max_in_memory_gb) and config.max_in_memory_gb > 0,
       f"max_in_memory_gb must be a finite number > 0, got {config.max_in_memory_gb}"),
      (_at_least(config.log_every_steps, 1), f"log_every_steps must be >= 1, got {config.log_every_steps}"),
      (_at_least(config.checkpoint_max_to_keep, 1),
       f"checkpoint_max_to_keep must be >= 1, got {config.checkpoint_max_to_keep}"),
      (config.halt_after_epochs is None or _at_least(config.halt_after_epochs, 1),
       f"halt_after_epochs must be >= 1 (or None), got {config.halt_after_epochs}"),
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
  """Returns `(tx, perturbation_loss, loss, aace_metrics)` for `config.optimizer`.

  `aace_metrics` are the AACE values every run logs from its first pass,
  whatever its perturbation loss: ``aace_kl``, KL(q || p) as the authors log
  it (the CSV's ``avg_aace_loss``), and ``aace_ce``, the cross-entropy
  against q whose gradient AACE-SAM perturbs along (``avg_aace_ce``).
  """
  base = optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.inject_hyperparams(optax.sgd)(
          learning_rate=learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum
      ),
  )
  rho = DEFAULT_RHO[config.optimizer] if config.rho is None else config.rho
  targets = {"threshold": config.aace_threshold, "mode": config.aace_mode}
  aace = functools.partial(aace_jax.aace_cross_entropy, **targets)
  aace_metrics = {"aace_kl": functools.partial(aace_jax.aace_kl_divergence, **targets), "aace_ce": aace}
  loss = functools.partial(aace_jax.cross_entropy, label_smoothing=config.label_smoothing)
  normalize = {} if config.normalize is None else {"normalize": config.normalize}
  if config.optimizer == "sgd":
    return base, aace, loss, aace_metrics
  if config.optimizer == "aace_sam":
    return aace_jax.aace_sam(base, rho, **normalize), aace, loss, aace_metrics
  adaptive = config.optimizer == "asam"
  return aace_jax.sam(base, rho, adaptive=adaptive, **normalize), loss, loss, aace_metrics


def default_compilation_cache_dir() -> str:
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache_home, "aace_jax", "xla")


# The persistent compilation cache's hits and misses in this process (jax.monitoring events).
compilation_cache_events = collections.Counter()


def _count_cache_event(event: str, **kwargs) -> None:
  del kwargs
  if event in ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"):
    compilation_cache_events[event.rsplit("/", 1)[1]] += 1


jax.monitoring.register_event_listener(_count_cache_event)


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


def evaluate(eval_step, state, batches: Iterator[dict]) -> tuple[float, float]:
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  for batch in batches:
    sums = jax.device_get(eval_step(state, batch))
    for k in totals:
      totals[k] += float(sums[k])
  return totals["loss_sum"] / totals["count"], totals["correct"] / totals["count"]


class StopSignals:
  """SIGTERM and SIGINT become a request to stop after the current step, the same step on every host.

  On one process both are Python handlers. On several (a pod, SLURM),
  SIGTERM, the scheduler's preemption notice, is left to JAX's preemption
  service, which `jax.distributed.initialize` starts: every host calls
  `reached_preemption_sync_point` each step and all stop at the step it
  names. SIGINT, which that service does not watch, is compared across
  hosts at log points.
  """

  def __init__(self):
    self.received = None
    self._previous = {}
    self.watched = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else (signal.SIGINT,)

  def __enter__(self):
    for sig in self.watched:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def stop_reason(self, step: int, at_log_point: bool) -> Optional[str]:
    """Why to stop after global step `step` (None: go on). Every host calls it at every step."""
    if jax.process_count() == 1:
      return self.received
    from jax.experimental import multihost_utils

    if multihost_utils.reached_preemption_sync_point(step):
      return "SIGTERM"
    if at_log_point and np.any(multihost_utils.process_allgather(np.array(self.received is not None))):
      return self.received or "SIGINT on another host"
    return None


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


def decoded_cache_dir(config) -> Optional[str]:
  """Where decoded TFDS splits are cached (in-memory sources such as the digits never are)."""
  if not config.cache_decoded:
    return None
  return config.decoded_cache_dir or os.path.join(input_pipeline.resolve_data_dir(config.data_dir), "decoded")


class TrainingStopped(RuntimeError):
  """Training cannot go on (non-finite steps); the last good state is checkpointed."""


# The step metrics that an epoch's row averages over its applied steps.
SUMMED_METRICS = (
    "ce_loss", "aace_kl", "aace_ce", "perturbation_grad_norm", "perturbation_norm", "loss", "accuracy",
)


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
  The training steps also add their metrics to the epoch's totals.

  Returns:
    ``(host_fed_step, resident_step, eval_step)``: ``host_fed_step(state,
    totals, {"image", "label"}) -> (state, totals, metrics)`` takes a global
    batch of stored images; ``resident_step(state, totals, DeviceSplit)``
    gathers the step's batch from a split held on the devices;
    ``eval_step(state, {"image", "label", "mask"})`` normalizes and evaluates.
  """
  steps_per_epoch, global_batch, spec = data.steps_per_epoch, data.global_batch, data.spec

  def epoch_and_positions(step):
    epoch, index = jnp.divmod(step, steps_per_epoch)
    return epoch, index * global_batch + jnp.arange(global_batch)

  def augmented_step(state, totals, images, labels):
    epoch, positions = epoch_and_positions(state.step)
    images = augment.augment_batch(
        images, seed=seed, epoch=epoch, positions=positions, kind=spec.augment, mean=data.mean, std=data.std
    )
    batch = {"image": jax.lax.with_sharding_constraint(images, batch_sharding), "label": labels}
    state, metrics = train_step(state, batch)
    return state, add_step(totals, metrics), metrics

  def resident_step(state, totals, split: DeviceSplit):
    _, positions = epoch_and_positions(state.step)
    rows = jax.lax.with_sharding_constraint(split.order[positions], batch_sharding)
    return augmented_step(state, totals, split.images[rows], split.labels[rows])

  def normalized_eval_step(state, batch):
    return eval_step(state, {**batch, "image": augment.normalize(batch["image"], data.mean, data.std)})

  return (
      jax.jit(lambda state, totals, batch: augmented_step(state, totals, batch["image"], batch["label"]),
              donate_argnums=(0, 1)),
      jax.jit(resident_step, donate_argnums=(0, 1)),
      jax.jit(normalized_eval_step),
  )


class Experiment(NamedTuple):
  """What a run needs, built from the config before anything is written.

  Attributes:
    state_shapes: the train state's shapes, dtypes and (replicated) shardings:
      what a checkpoint is restored into, with no init run.
    init_state: ``() ->`` the initial train state on the devices (compiles and
      runs the parameter init; a resumed run never calls it).
    totals: the initial epoch totals, on the devices.
    train_step: ``(state, totals, batch) -> (state, totals, metrics)``, compiled.
    train_batches: ``(epoch, start_step) ->`` the batches to give `train_step`, on the devices.
    eval_step, eval_batches: likewise for evaluation (``eval_batches()``).
  """

  data: input_pipeline.Data
  state_shapes: aace_jax.TrainState
  init_state: Callable[[], aace_jax.TrainState]
  totals: dict
  train_step: Callable
  train_batches: Callable[[int, int], Iterator]
  eval_step: Callable
  eval_batches: Callable[[], Iterator]


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
  tx, perturbation_loss, loss, aace_metrics = create_optimizer(config, data.steps_per_epoch)
  model = models.create_model(config.model, data.spec.num_classes, DTYPES[config.dtype])
  apply_fn = aace_jax.linen_apply_fn(model)

  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch_sharding = NamedSharding(mesh, P("data"))
  sharded_train_step = aace_jax.shard_step(
      aace_jax.make_train_step(
          apply_fn, tx, perturbation_loss=perturbation_loss, loss=loss, axis_name="data",
          sync_perturbation=config.sync_perturbation, grad_accum_steps=config.grad_accum_steps,
          extra_metrics=aace_metrics,
      ),
      mesh,
  )
  sharded_eval_step = aace_jax.shard_step(aace_jax.make_eval_step(apply_fn, loss=loss, axis_name="data"), mesh)
  host_fed_step, resident_step, eval_step = make_device_steps(
      sharded_train_step, sharded_eval_step, data, seed=config.seed, batch_sharding=batch_sharding
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

  def create_state(variables):
    params = variables.pop("params")
    return aace_jax.TrainState.create(params=params, model_state=dict(variables), tx=tx, rng=state_key)

  def init_state():
    return aace_jax.replicate_on_mesh(create_state(models.init_variables(model, init_key, data.spec.image_shape)), mesh)

  replicated = NamedSharding(mesh, P())
  state_shapes = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(lambda: create_state(model.init(init_key, jnp.zeros((1, *data.spec.image_shape)), train=False))),
  )
  return Experiment(
      data=data,
      state_shapes=state_shapes,
      init_state=init_state,
      totals=aace_jax.replicate_on_mesh(zero_totals(), mesh),
      train_step=train_step,
      train_batches=train_batches,
      eval_step=eval_step,
      eval_batches=lambda: prefetch_to_device(data.eval_batches(), to_global),
  )


def first_step_message(seconds: float) -> str:
  cache = compilation_cache_events
  return (
      f"first step after {seconds:.1f} s (start, data, init, compile and the step; compilation cache:"
      f" {cache['cache_hits']} hits, {cache['cache_misses']} misses)"
  )


def finish_epoch(epoch, totals, steps_run, seconds, state, experiment, config, *, wall_time) -> dict:
  """The epoch's CSV row: means over its applied steps, the last learning rate (as the authors log
  it), evaluation and throughput; `wall_time()` is read after evaluation."""
  totals = jax.device_get(totals)
  applied = int(totals["applied"])
  mean = {name: float(value) / applied if applied else float("nan") for name, value in totals["sums"].items()}
  val_loss, val_acc = evaluate(experiment.eval_step, state, experiment.eval_batches())
  return {
      "epoch": epoch,
      "lr": float(totals["learning_rate"]),
      "avg_ce_loss": mean["ce_loss"],
      "avg_aace_loss": mean["aace_kl"],
      "avg_aace_ce": mean["aace_ce"],
      "avg_grad_norm": mean["perturbation_grad_norm"],
      "avg_perturbation": mean["perturbation_norm"],
      "train_loss": mean["loss"],
      "train_acc": mean["accuracy"],
      "val_loss": val_loss,
      "val_acc": val_acc,
      "skipped_steps": float(totals["skipped"]),
      "images_per_sec": steps_run * config.batch_size / seconds,
      "wall_time": wall_time(),
  }


def _train(config, workdir, experiment: Experiment, signals, is_writer: bool, invocation_start: float) -> dict:
  """The loop of `train_and_evaluate` (below), in a workdir it holds."""
  from tqdm.auto import tqdm

  data, train_step = experiment.data, experiment.train_step
  steps_per_epoch = data.steps_per_epoch
  files = workdir_files.RunFiles(workdir, enabled=is_writer)
  checkpoints = checkpointing.Checkpoints(
      os.path.abspath(os.path.join(workdir, "checkpoints")), config.checkpoint_max_to_keep
  )
  try:
    restored = checkpoints.restore_latest(
        experiment.state_shapes, experiment.totals, checkpointing.empty_history(config.num_epochs)
    )
    if restored is None:  # a new run: only now are the parameters initialized
      restored = experiment.init_state(), experiment.totals, checkpointing.empty_history(config.num_epochs)
    state, totals, history = restored
    rows = checkpointing.history_rows(history, files.read())
    files.restore(rows)
    start_step = int(jax.device_get(state.step))
    start_epoch = start_step // steps_per_epoch
    wall_offset = max((row["wall_time"] for row in rows if np.isfinite(row["wall_time"])), default=0.0)
    run_start = time.time()
    last_row = rows[-1] if rows else None
    stopped_by, first_step_seconds = None, None
    halt_at = None if config.halt_after_epochs is None else start_epoch + config.halt_after_epochs
    for epoch in range(start_epoch, config.num_epochs):
      if halt_at is not None and epoch >= halt_at:
        stopped_by = "halt_after_epochs"
        break
      first = start_step - epoch * steps_per_epoch if epoch == start_epoch else 0
      if first == 0:  # else the checkpoint's totals hold the epoch's first steps
        totals = reset_epoch_totals(totals)
      bar = tqdm(
          total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{config.num_epochs}",
          disable=not is_writer, leave=False, dynamic_ncols=True,
      )
      epoch_start, steps_run = time.time(), 0
      for index, batch in enumerate(experiment.train_batches(epoch, first), start=first):
        state, totals, metrics = train_step(state, totals, batch)
        steps_run += 1
        bar.update(1)
        if first_step_seconds is None:
          jax.block_until_ready(metrics)
          first_step_seconds = time.time() - invocation_start
          if is_writer:
            tqdm.write(first_step_message(first_step_seconds))
        at_log_point = (index + 1) % config.log_every_steps == 0 or index + 1 == steps_per_epoch
        if at_log_point:
          latest = jax.device_get({**metrics, "skip_streak": totals["skip_streak"]})
          bar.set_postfix(loss=f"{latest['loss']:.3f}", acc=f"{latest['accuracy']:.3f}",
                          lr=f"{latest['learning_rate']:.4g}")
          if latest["skip_streak"] >= config.max_consecutive_skips:
            checkpoints.save(state, totals, history)  # skipped steps left the state as it was: the last good one
            raise TrainingStopped(
                f"stopped: the last {int(latest['skip_streak'])} steps were not finite and were skipped (step"
                f" {int(jax.device_get(state.step))}); the last good state is checkpointed in {workdir}."
            )
        stopped_by = signals.stop_reason(epoch * steps_per_epoch + index + 1, at_log_point)
        if stopped_by is not None:
          break
      bar.close()
      if stopped_by is not None:
        checkpoints.save(state, totals, history)
        break
      last_row = finish_epoch(
          epoch, totals, steps_run, time.time() - epoch_start, state, experiment, config,
          wall_time=lambda: wall_offset + time.time() - run_start,
      )
      # The row is part of the checkpoint: a kill before the CSV write loses nothing.
      history = checkpointing.with_row(history, last_row)
      checkpoints.save(state, totals, history)
      files.append(last_row)
      if is_writer:
        tqdm.write(
            f"epoch {epoch + 1}/{config.num_epochs}: train loss {last_row['train_loss']:.4f}"
            f" acc {last_row['train_acc']:.4f} | val loss {last_row['val_loss']:.4f} acc {last_row['val_acc']:.4f}"
            f" | lr {last_row['lr']:.4g} | {last_row['images_per_sec']:.0f} img/s"
        )
  finally:
    checkpoints.wait()  # a stop or an error still leaves the last checkpoint whole
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


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, data: Optional[input_pipeline.Data] = None
) -> dict[str, Any]:
  """Trains `config.model` on `config.dataset` with `config.optimizer` and evaluates each epoch.

  Resumes from the newest usable checkpoint in `workdir/checkpoints`, and
  rebuilds metrics.csv from it. Stops early, resumably, after
  `config.halt_after_epochs` epochs or on SIGTERM/SIGINT (after the current
  step, with a checkpoint). One run at a time holds the workdir.

  Args:
    config: the run's config (see `train/configs/default.py`).
    workdir: where outputs and checkpoints go.
    data: already opened data to train on instead of `config.dataset` (benchmarks).

  Returns:
    The last finished epoch's CSV row plus `workdir`, `finished`, `stopped_by`,
    `step` and `first_step_seconds`.
  """
  invocation_start = time.time()
  check_config(config)
  if not config.overwrite:
    check_resumable(config, workdir)
  is_writer = jax.process_index() == 0
  with StopSignals() as signals:  # a signal during start-up stops the run after its first step
    experiment = create_experiment(config, data)
    # Everything that can be wrong with the inputs is known by now: write.
    os.makedirs(workdir, exist_ok=True)
    lock = workdir_files.WorkdirLock(workdir)
    if is_writer:
      lock.acquire()
    try:
      if is_writer:
        if config.overwrite:
          workdir_files.clear_run(workdir)
        workdir_files.write_config(config, workdir)
      return _train(config, workdir, experiment, signals, is_writer, invocation_start)
    finally:
      lock.release()
