"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

Reads top to bottom, as flax's examples/imagenet does: how a run stops, how
batches reach the devices, the device-side steps, the experiment (data,
model, method, jitted steps), evaluation, the epoch's bookkeeping, then the
loop and `train_and_evaluate`. The step is
`aace_jax.make_train_step`, run over a data mesh of every device with
`aace_jax.shard_step`, inside one jitted function that also augments and
normalizes the batch (`train/augment.py`) and adds the step's metrics to the
epoch's totals: the host only gathers stored images and labels and transfers
them a few steps ahead, or, with `data_on_device`, sends nothing at all.
Elsewhere: config checks in `config_checks.py`, the method in
`methods.py`, the compilation cache in `compilation_cache.py`, the
workdir's files in `run_files.py`, checkpoints in `checkpointing.py`, the
epoch's row of metrics.csv (columns, running totals, plots) in `epoch_row.py`.
"""

import collections
import concurrent.futures
import functools
import itertools
import os
import signal
import sys
import time
from typing import Any
from typing import Callable
from typing import Iterator
from typing import NamedTuple
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

import aace_jax
from train import augment
from train import checkpointing
from train import compilation_cache
from train import config_checks
from train import epoch_row
from train import idx
from train import input_pipeline
from train import methods
from train import models
from train import run_files


class TrainingStopped(RuntimeError):
  """Training cannot go on (non-finite steps); the last good state is checkpointed."""


# What a run reports in one line, without a traceback: bad inputs and states it found, not bugs.
RUN_ERRORS = (
  config_checks.ConfigError,
  input_pipeline.DatasetNotFoundError,
  input_pipeline.RecordError,
  idx.IdxError,
  input_pipeline.DataMismatch,
  checkpointing.CheckpointError,
  TrainingStopped,
  run_files.WorkdirBusy,
  run_files.RunFilesError,
)


# `stopped_by` of a run that a signal stopped.
SIGNAL_STOPS = ("SIGTERM", "SIGINT", "SIGINT on another host")


def exit_now(message: str) -> None:
  """Prints `message` and ends the process with status 1 without waiting for other threads.

  After a failed write, orbax's threads for the writes that followed wait
  for a signal that never comes, and the interpreter would wait for them at
  exit. Everything the run wrote is closed by then, and the lock is the
  kernel's to drop.
  """
  print(message, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)


def ignore_stop_signals() -> None:
  """For a process ending after a stop: SIGINT and SIGTERM are ignored until it exits.

  Python's own handlers are taken down while the interpreter shuts down
  (JAX's teardown takes a second or more), and a Ctrl-C pressed again then
  would kill the process with the signal's status although its checkpoint is
  written.
  """
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)


class StopSignals:
  """SIGTERM and SIGINT become a request to stop after the current step, the same step on every host.

  On one process both are Python handlers. On several (a pod, SLURM),
  SIGTERM, the scheduler's preemption notice, is left to JAX's preemption
  service, which `jax.distributed.initialize` starts: every host calls
  `reached_preemption_sync_point` each step and all stop at the step it
  names. SIGINT, which that service does not watch, is compared across
  hosts at log points.

  Signals that arrive while the stop's checkpoint is written are absorbed
  like the first; a process that ends after a stop calls
  `ignore_stop_signals` for its shutdown.
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
    return state, epoch_row.add_step(totals, metrics), metrics

  def resident_step(state, totals, split: DeviceSplit):
    _, positions = epoch_and_positions(state.step)
    rows = jax.lax.with_sharding_constraint(split.order[positions], batch_sharding)
    return augmented_step(state, totals, split.images[rows], split.labels[rows])

  def normalized_eval_step(state, batch):
    return eval_step(state, {**batch, "image": augment.normalize(batch["image"], data.mean, data.std)})

  def host_fed_step(state, totals, batch):
    return augmented_step(state, totals, batch["image"], batch["label"])

  return (
    jax.jit(host_fed_step, donate_argnums=(0, 1)),
    jax.jit(resident_step, donate_argnums=(0, 1)),
    jax.jit(normalized_eval_step),
  )


class Experiment(NamedTuple):
  """What a run needs, built from the config before anything is written.

  Attributes:
    data: the dataset, opened.
    model: the Flax model.
    method: the training method (`methods.TrainingMethod`: the
      transformation and its losses).
    mesh: the devices, one ``data`` axis.
    state_shapes: the train state's shapes, dtypes and (replicated) shardings,
      ``jax.eval_shape`` of `init_state`'s program: what a checkpoint is
      restored into, with no init run.
    init_state: ``() ->`` the initial train state on the devices (compiles and
      runs the parameter init; a resumed run never calls it).
    totals: the initial epoch totals, on the devices.
    train_step: ``(state, totals, batch) -> (state, totals, metrics)``, jitted:
      the step that takes every pass of the method.
    train_step_at: ``(step number) ->`` the jitted step to run at that step:
      `train_step`, or with ``perturb_every=k > 1`` the one-pass step between
      the k-th steps (the two programs of an ``aace_jax.CompiledStep``, as
      the library runs them, chosen from the step number: no conditional on
      the device).
    train_step_shapes: ``() ->`` the shapes, dtypes and shardings of
      `train_step`'s arguments, to compile it before the state exists.
    train_batches: ``(epoch, start_step) ->`` the batches to give `train_step`, on the devices.
    eval_step, evaluation_batches: likewise for evaluation: ``evaluation_batches`` maps ``"test"`` (the
      dataset's test split) and, with ``config.validation_examples``, ``"validation"`` to ``() ->`` its batches.
  """

  data: input_pipeline.Data
  model: Any
  method: methods.TrainingMethod
  mesh: jax.sharding.Mesh
  state_shapes: aace_jax.TrainState
  init_state: Callable[[], aace_jax.TrainState]
  totals: dict
  train_step: Callable
  train_step_at: Callable[[int], Callable]
  train_step_shapes: Callable[[], tuple]
  train_batches: Callable[[int, int], Iterator]
  eval_step: Callable
  evaluation_batches: dict[str, Callable[[], Iterator]]

  def eval_batches(self) -> Iterator:
    """The test split's batches, on the devices."""
    return self.evaluation_batches["test"]()


class Inputs(NamedTuple):
  """How the training batches reach the step: the batches of an epoch, and their shapes before any is read."""

  batches: Callable[[int, int], Iterator]
  shapes: Callable[[], Any]


def host_fed_inputs(data: input_pipeline.Data, batch_sharding: NamedSharding) -> Inputs:
  """The host reads and batches the stored images; each batch goes to the devices as a global array."""

  to_global = host_fed_to_global(batch_sharding)

  def shapes():
    # One stored record tells the dtype (uint8, or float32 for float datasets) without reading a batch.
    image, label = data.train.take(np.arange(1))
    return {
      "image": jax.ShapeDtypeStruct((data.global_batch, *image.shape[1:]), image.dtype, sharding=batch_sharding),
      "label": jax.ShapeDtypeStruct((data.global_batch,), label.dtype, sharding=batch_sharding),
    }

  return Inputs(lambda epoch, start: prefetch_to_device(data.train_batches(epoch, start), to_global), shapes)


def device_resident_inputs(data: input_pipeline.Data, mesh: jax.sharding.Mesh) -> Inputs:
  """The whole train split on every device; each step gathers its batch there from the epoch's order."""
  images, labels = aace_jax.replicate_on_mesh((data.train.images, data.train.labels), mesh)

  def batches(epoch, start_step):
    split = DeviceSplit(images, labels, aace_jax.replicate_on_mesh(data.epoch_order(epoch), mesh))
    return itertools.repeat(split, data.steps_per_epoch - start_step)

  def shapes():
    order = jax.ShapeDtypeStruct((len(data.train),), jnp.int32, sharding=NamedSharding(mesh, P()))
    return DeviceSplit(images, labels, order)

  return Inputs(batches, shapes)


def open_data(config: ml_collections.ConfigDict) -> input_pipeline.Data:
  """This host's part of the config's dataset, opened as the config says."""
  return input_pipeline.create_data(
    config.dataset,
    global_batch=config.batch_size,
    global_eval_batch=config.eval_batch_size,
    seed=config.seed,
    data_dir=config.data_dir,
    cache_dir=decoded_cache_dir(config),
    max_in_memory_bytes=config.max_in_memory_gb * 2**30,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    train_examples=config.train_examples,
    validation_examples=config.validation_examples,
    label_noise=config.label_noise,
    label_noise_kind=config.label_noise_kind,
    augment=config.augment,
  )


def state_initializer(model, method: methods.TrainingMethod, image_shape: tuple) -> Callable:
  """`(init_key, state_key) -> TrainState`: the model's variables and the optimizer's state, in one program.

  Both keys are arguments, so one compiled program serves every seed. The
  optimizer's ``init`` belongs in it: run op by op it compiles one small
  program per parameter shape (16 s for PyramidNet-272's 408 shapes, against
  2 s compiled at once).
  """

  def init(init_key, state_key):
    variables = dict(model.init(init_key, jnp.zeros((1, *image_shape)), train=False))
    params = variables.pop("params")
    return aace_jax.TrainState.create(params=params, model_state=variables, tx=method.tx, rng=state_key)

  return init


def create_experiment(config: ml_collections.ConfigDict, data: Optional[input_pipeline.Data] = None) -> Experiment:
  """Opens the data (unless given), builds the model, the method and the jitted steps over a mesh of every device."""
  data = open_data(config) if data is None else data
  if config.data_on_device and not data.in_memory:
    raise config_checks.ConfigError(
      f"Bad config: data_on_device needs the splits in memory, but {config.dataset!r} is larger than"
      f" max_in_memory_gb={config.max_in_memory_gb}."
    )
  method = config_checks.checked_method(config, data.steps_per_epoch)
  model = models.create_model(config.model, data.spec.num_classes, models.DTYPES[config.dtype])
  apply_fn = aace_jax.linen_apply_fn(model)
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  eval_step = aace_jax.shard_step(aace_jax.make_eval_step(apply_fn, loss=method.loss, axis_name="data"), mesh)

  train_step = aace_jax.make_train_step(
    apply_fn,
    method.tx,
    perturbation_loss=method.perturbation_loss,
    loss=method.loss,
    axis_name="data",
    sync_perturbation=config.sync_perturbation,
    grad_accum_steps=config.grad_accum_steps,
    perturbation_batch_fraction=config.perturbation_batch_fraction,
    extra_metrics=method.aace_metrics,
  )

  def device_steps(step: aace_jax.Step) -> tuple[Callable, Callable]:
    steps = make_device_steps(
      aace_jax.shard_step(step, mesh), eval_step, data, seed=config.seed, batch_sharding=batch_sharding
    )
    host_fed_step, resident_step, normalized_eval_step = steps
    return (resident_step if config.data_on_device else host_fed_step), normalized_eval_step

  # With perturb_every = k > 1, the library's two programs (a new perturbation, and the step between), picked on the
  # host from the step number: no conditional on the device, no read of the counter.
  programs = aace_jax.CompiledStep(train_step, lambda step: device_steps(step)[0])
  cycle = config.perturb_every if config.method != "sgd" else 1
  step_at = lambda step_number: programs.program(step_number % cycle == 0 if cycle > 1 else None)
  normalized_eval_step = device_steps(train_step)[1]
  inputs = device_resident_inputs(data, mesh) if config.data_on_device else host_fed_inputs(data, batch_sharding)
  init = state_initializer(model, method, data.spec.image_shape)
  init_key, state_key = jax.random.split(jax.random.key(config.seed))
  state_shapes = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), jax.eval_shape(init, init_key, state_key)
  )
  totals = aace_jax.replicate_on_mesh(epoch_row.zero_totals(), mesh)
  return Experiment(
    data=data,
    model=model,
    method=method,
    mesh=mesh,
    state_shapes=state_shapes,
    init_state=lambda: aace_jax.replicate_on_mesh(models.run_init(init, init_key, state_key), mesh),
    totals=totals,
    train_step=step_at(0),
    train_step_at=step_at,
    train_step_shapes=lambda: (state_shapes, totals, inputs.shapes()),
    train_batches=inputs.batches,
    eval_step=normalized_eval_step,
    evaluation_batches=evaluation_batches(data, batch_sharding),
  )


def evaluation_batches(data: input_pipeline.Data, batch_sharding: NamedSharding) -> dict[str, Callable[[], Iterator]]:
  """`{"test": () -> batches, "validation": ...}`: the splits evaluated after every epoch, on the devices."""
  to_global = host_fed_to_global(batch_sharding)
  splits = {"test": data.eval, "validation": data.validation}
  return {
    name: functools.partial(lambda split: prefetch_to_device(data.evaluation_batches(split), to_global), split)
    for name, split in splits.items()
    if split is not None
  }


def host_fed_to_global(batch_sharding: NamedSharding) -> Callable:
  """`batch -> batch` of global arrays split over `batch_sharding`, from this host's rows."""
  return lambda batch: jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x), batch)


def evaluate(eval_step, state, batches: Iterator[dict]) -> tuple[float, float]:
  """`(mean loss, accuracy)` over the batches; their sums are fetched once, at the end, not batch by batch."""
  sums = jax.device_get([eval_step(state, batch) for batch in batches])
  totals = {name: sum(float(batch_sums[name]) for batch_sums in sums) for name in ("loss_sum", "correct", "count")}
  return totals["loss_sum"] / totals["count"], totals["correct"] / totals["count"]


def evaluate_epoch(experiment: Experiment, state, epoch: int, config, rows: list[dict]) -> dict:
  """`{split: (loss, accuracy)}` of the splits evaluated after `epoch`.

  The validation split, where there is one, after every epoch. The test
  split after every `config.test_every_epochs`-th epoch, the last, and every
  epoch whose validation accuracy is higher than that of every earlier epoch
  (`rows`), so that the test accuracy of the best-validation epoch is always
  known.
  """
  batches = experiment.evaluation_batches
  evaluations = {}
  if "validation" in batches:
    evaluations["validation"] = evaluate(experiment.eval_step, state, batches["validation"]())
  best_before = max((row["holdout_acc"] for row in rows if np.isfinite(row["holdout_acc"])), default=-np.inf)
  if (
    (epoch + 1) % config.test_every_epochs == 0
    or epoch == config.num_epochs - 1
    or ("validation" in evaluations and evaluations["validation"][1] > best_before)
  ):
    evaluations["test"] = evaluate(experiment.eval_step, state, batches["test"]())
  return evaluations


def duration(seconds: float) -> str:
  """`seconds` for a person: "40 s", "12 min", "3 h 05 min"."""
  if seconds < 90:
    return f"{seconds:.0f} s"
  minutes = round(seconds / 60)
  return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


class RunClock:
  """The run's wall time across resumptions, the time from the invocation to its first step, and the time left.

  The time left is the time per step since the first step ended (the first
  one holds the compile), evaluations included once an epoch has ended,
  times the steps left.
  """

  def __init__(self, invocation_start: float, rows: list[dict], *, steps_left: int):
    self.invocation_start = invocation_start
    self.offset = max((row["wall_time"] for row in rows if np.isfinite(row["wall_time"])), default=0.0)
    self.start = time.time()
    self.first_step_seconds: Optional[float] = None
    self.first_step_end: Optional[float] = None
    self.steps_left, self.steps_run, self.estimated = steps_left, 0, False

  def after_step(self, metrics, *, show: bool, at_log_point: bool) -> None:
    """Times the run's first step (waiting for it once) and says so; at the first log point after it, says how
    long the run will take."""
    self.steps_run += 1
    self.steps_left -= 1
    if self.first_step_seconds is None:
      jax.block_until_ready(metrics)
      self.first_step_end = time.time()
      self.first_step_seconds = self.first_step_end - self.invocation_start
      if show:
        tqdm.write(compilation_cache.first_step_message(self.first_step_seconds))
    elif at_log_point and not self.estimated:
      self.estimated = True
      if show:
        tqdm.write(
          f"estimated: about {duration(self.time_left())} for the {self.steps_left} steps left"
          f" ({(time.time() - self.first_step_end) / (self.steps_run - 1):.3g} s a step; evaluation not counted yet)"
        )

  def time_left(self) -> Optional[float]:
    """Seconds until the last step, at the time per step (and evaluation) measured since the first step; None
    while this invocation has timed no step (a resumed run that only evaluates an ended epoch)."""
    if self.first_step_end is None:
      return None
    return (time.time() - self.first_step_end) / max(self.steps_run - 1, 1) * self.steps_left

  def wall_time(self) -> float:
    return self.offset + time.time() - self.start


class EpochLog:
  """One epoch's bookkeeping on the host: progress bar, log points, throughput, and its CSV row."""

  def __init__(
    self, epoch: int, first_index: int, config: ml_collections.ConfigDict, steps_per_epoch: int, *, show: bool
  ):
    self.epoch, self.config, self.steps_per_epoch, self.show = epoch, config, steps_per_epoch, show
    self.steps_run, self.start, self.train_seconds = 0, time.time(), None
    self.bar = tqdm(
      total=steps_per_epoch,
      initial=first_index,
      desc=f"epoch {epoch + 1}/{config.num_epochs}",
      disable=not show,
      leave=False,
      dynamic_ncols=True,
    )

  def after_step(self, index: int, metrics: dict, totals: dict) -> Optional[dict]:
    """Counts step `index`; at a log point (every `log_every_steps`, and the epoch's last step) fetches its
    metrics and the skip streak to the host, shows them and returns them; elsewhere returns None."""
    self.steps_run += 1
    self.bar.update(1)
    if (index + 1) % self.config.log_every_steps and index + 1 != self.steps_per_epoch:
      return None
    latest = jax.device_get({**metrics, "skip_streak": totals["skip_streak"]})
    self.bar.set_postfix(
      loss=f"{latest['loss']:.3f}", acc=f"{latest['accuracy']:.3f}", lr=f"{latest['learning_rate']:.4g}"
    )
    return latest

  def close(self) -> None:
    self.train_seconds = time.time() - self.start
    self.bar.close()

  def row(self, totals: dict, evaluations: dict, wall_time: float) -> dict:
    """The epoch's CSV row (`epoch_row.row`), with the throughput of the steps this process ran."""
    # NaN for an epoch that a resumed run only evaluated (its end-of-epoch checkpoint lacked its row).
    images_per_sec = self.steps_run * self.config.batch_size / self.train_seconds if self.steps_run else np.nan
    return epoch_row.row(self.epoch, totals, evaluations, images_per_sec=images_per_sec, wall_time=wall_time)

  def report(self, row: dict, time_left: Optional[float] = None) -> None:
    if self.show:
      validation = "" if np.isnan(row["holdout_acc"]) else f" | validation acc {row['holdout_acc']:.4f}"
      test = "" if np.isnan(row["val_acc"]) else f" | test loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
      tqdm.write(
        f"epoch {self.epoch + 1}/{self.config.num_epochs}: train loss {row['train_loss']:.4f}"
        f" acc {row['train_acc']:.4f}{validation}{test} | lr {row['lr']:.4g} | {row['images_per_sec']:.0f} img/s"
        + ("" if time_left is None else f" | about {duration(time_left)} left")
      )


def breakdown_warning(row: dict, config: ml_collections.ConfigDict) -> Optional[str]:
  """A warning when an epoch's row shows a sharpness-aware run breaking down, else None.

  Two signs, each measured where unnormalized AACE-SAM broke down (docs/experiments.md,
  "When AACE-SAM breaks down"):

  - the loss at `w_adv` below `warn_loss_at_w_adv_ratio` times the loss at
    `w`: a perturbation raises the training loss (SAM ascends it; AACE moves
    probability away from the true class), so when it lowers it the updates
    fit `w_adv` and leave `w` behind, and the loss at `w` climbs;
  - a perturbation longer than `warn_relative_perturbation` times the
    weights' norm: SAM's rho 0.05 is a few thousandths of it, AACE-SAM's
    stayed under 0.03 of it where it trained well, and a digits run at rho
    20 (0.07 of it) did not train.

  SGD's perturbation is zero and its two losses are one. NaN (an epoch with
  no applied step) never warns.
  """
  at_w, at_w_adv = row["avg_ce_loss"], row["train_loss"]
  perturbation, weights = row["avg_perturbation"], row["avg_param_norm"]
  loss_ratio, relative = config.warn_loss_at_w_adv_ratio, config.warn_relative_perturbation
  signs = []
  if loss_ratio is not None and at_w_adv < loss_ratio * at_w:
    signs.append(
      f"the training loss at the perturbed weights ({at_w_adv:.4f}) is below {loss_ratio:g} x the loss at the"
      f" weights ({at_w:.4f}): the steps fit w_adv, not w"
    )
  if relative is not None and perturbation > relative * weights:
    signs.append(
      f"the perturbation's norm ({perturbation:.4g}) exceeds {relative:g} x the weights' norm ({weights:.4g})"
    )
  if not signs:
    return None
  return (
    f"epoch {row['epoch'] + 1}: {'; '.join(signs)}. The run may be breaking down: bound the perturbation"
    " (--config.max_perturbation_norm, or --config.normalize=True with a radius such as --config.rho=0.05), or"
    " normalize before the classifier; see docs/experiments.md, 'When AACE-SAM breaks down'."
  )


def compile_train_step_ahead(experiment: Experiment) -> concurrent.futures.Future:
  """Traces and lowers the train step (both, with perturb_every > 1) from its arguments' shapes; compiles in a thread.

  Returns once the compile has started: the state is initialized or restored
  meanwhile, since XLA compiles outside Python's lock (PyramidNet-272's init
  beside its step's compile on a CPU, a checkpoint's restore beside it on a
  GPU). The trace and lowering are Python and stay in this thread, ahead of
  the init's own trace, which would otherwise slow them down. The first step,
  called with arguments of those shapes, finds the executable in jit's own
  caches and compiles nothing. Wait on the future before the first step: a
  step called while the compile runs would compile it a second time.
  """
  steps = {id(step): step for step in (experiment.train_step, experiment.train_step_at(1))}
  lowered = [step.trace(*experiment.train_step_shapes()).lower() for step in steps.values()]
  executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_train_step")
  compiling = executor.submit(lambda: [program.compile() for program in lowered])
  executor.shutdown(wait=False)
  return compiling


def restore_or_initialize(checkpoints: checkpointing.Checkpoints, experiment: Experiment, num_epochs: int):
  """`(state, totals, history)` of the newest usable checkpoint, or of a new run (only then is the model
  initialized)."""
  restored = checkpoints.restore_latest(
    experiment.state_shapes, experiment.totals, checkpointing.empty_history(num_epochs)
  )
  if restored is None:
    return experiment.init_state(), experiment.totals, checkpointing.empty_history(num_epochs)
  return restored


def first_epoch(start_step: int, steps_per_epoch: int, rows: list) -> int:
  """The epoch a run resumed at `start_step` starts in.

  A checkpoint at an epoch's end without the epoch's row (non-finite steps
  stopped the run at its last step, or an older trainer stopped there):
  that epoch, with no steps left, to evaluate it.
  """
  epoch_of_last_step = (start_step - 1) // steps_per_epoch
  unevaluated = start_step > 0 and epoch_of_last_step not in {row["epoch"] for row in rows}
  return epoch_of_last_step if unevaluated else start_step // steps_per_epoch


def record_epoch(files, checkpoints, history, state, totals, row: dict):
  """Saves the epoch's row in the checkpoint, then in the CSV: a kill before the CSV write loses nothing."""
  history = checkpointing.with_row(history, row)
  checkpoints.save(state, totals, history)
  try:
    files.append(row)
  except OSError as error:
    checkpoints.wait()  # the row is in the checkpoint being written: make it whole, or say it is not
    raise run_files.RunFilesError(
      f"could not write {files.csv_path} ({error.strerror or error}); the checkpoint of step"
      f" {checkpoints.last_saved}, written whole, holds its rows: rerun to rebuild it."
    ) from error
  return history


def train_loop(
  config, workdir: str, experiment: Experiment, signals: StopSignals, *, is_writer: bool, invocation_start: float
) -> dict:
  """Resumes, trains and evaluates epoch by epoch in a workdir this process holds; see `train_and_evaluate`."""
  steps_per_epoch = experiment.data.steps_per_epoch
  files = run_files.RunFiles(workdir, enabled=is_writer)
  checkpoints = checkpointing.Checkpoints(
    os.path.abspath(os.path.join(workdir, "checkpoints")), config.checkpoint_max_to_keep
  )
  try:
    compiling = compile_train_step_ahead(experiment)
    state, totals, history = restore_or_initialize(checkpoints, experiment, config.num_epochs)
    rows = checkpointing.history_rows(history, files.read())
    files.restore(rows)
    start_step = int(jax.device_get(state.step))
    clock = RunClock(invocation_start, rows, steps_left=config.num_epochs * steps_per_epoch - start_step)
    last_row = rows[-1] if rows else None
    stopped_by = None
    halt_at = None if config.halt_after_epochs is None else start_step // steps_per_epoch + config.halt_after_epochs
    compiling.result()  # raises what the compile raised
    for epoch in range(first_epoch(start_step, steps_per_epoch, rows), config.num_epochs):
      if halt_at is not None and epoch >= halt_at:
        stopped_by = "halt_after_epochs"
        break
      first = max(start_step - epoch * steps_per_epoch, 0)
      if first == 0:  # else the checkpoint's totals hold the epoch's first steps
        totals = epoch_row.reset_epoch_totals(totals)
      log = EpochLog(epoch, first, config, steps_per_epoch, show=is_writer)
      for index, batch in enumerate(experiment.train_batches(epoch, first), start=first):
        state, totals, metrics = experiment.train_step_at(epoch * steps_per_epoch + index)(state, totals, batch)
        latest = log.after_step(index, metrics, totals)
        clock.after_step(metrics, show=is_writer, at_log_point=latest is not None)
        if latest is not None and latest["skip_streak"] >= config.max_consecutive_skips:
          checkpoints.save(state, totals, history)  # skipped steps left the state as it was: the last good one
          raise TrainingStopped(
            f"stopped: the last {int(latest['skip_streak'])} steps were not finite and were skipped (step"
            f" {int(jax.device_get(state.step))}); the last good state is checkpointed in {workdir}."
          )
        stopped_by = signals.stop_reason(epoch * steps_per_epoch + index + 1, at_log_point=latest is not None)
        if stopped_by is not None:
          break
      log.close()
      if stopped_by is not None and index + 1 < steps_per_epoch:
        checkpoints.save(state, totals, history)  # with the epoch's running totals: the resumed run ends it
        break
      # A stop after the epoch's last step still evaluates it, so that its checkpoint holds its row.
      evaluations = evaluate_epoch(experiment, state, epoch, config, files.rows)
      last_row = log.row(totals, evaluations, wall_time=clock.wall_time())
      history = record_epoch(files, checkpoints, history, state, totals, last_row)
      log.report(last_row, time_left=clock.time_left() if clock.steps_left else None)
      warning = breakdown_warning(last_row, config)
      if warning is not None and is_writer:
        tqdm.write(f"warning: {warning}")
      if stopped_by is not None:
        break
  finally:
    checkpoints.wait()  # a stop or an error still leaves the last checkpoint whole
    checkpoints.close()
    files.close()
  finished = last_row is not None and last_row["epoch"] == config.num_epochs - 1
  return {
    **(last_row or {}),
    "workdir": workdir,
    "finished": finished,
    "stopped_by": stopped_by,
    "step": int(jax.device_get(state.step)),
    "first_step_seconds": clock.first_step_seconds,
  }


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, data: Optional[input_pipeline.Data] = None
) -> dict[str, Any]:
  """Trains `config.model` on `config.dataset` with `config.method` and evaluates each epoch.

  Resumes from the newest usable checkpoint in `workdir/checkpoints`, and
  rebuilds metrics.csv from it. Stops early, resumably, after
  `config.halt_after_epochs` epochs or on SIGTERM/SIGINT (after the current
  step, with a checkpoint; at an epoch's last step, after its evaluation).
  One run at a time holds the workdir.

  Args:
    config: the run's config (see `train/configs/default.py`).
    workdir: where outputs and checkpoints go.
    data: already opened data to train on instead of `config.dataset` (benchmarks).

  Returns:
    The last finished epoch's CSV row plus `workdir`, `finished`, `stopped_by`,
    `step` and `first_step_seconds`.
  """
  invocation_start = time.time()
  config_checks.check_config(config, with_the_library=False)  # create_experiment checks the method it builds
  if not config.overwrite:
    config_checks.check_resumable(config, workdir)
  is_writer = jax.process_index() == 0
  with StopSignals() as signals:  # a signal during start-up stops the run after its first step
    experiment = create_experiment(config, data)
    if is_writer:
      tqdm.write(f"data: {experiment.data.origin}")
    # Everything that can be wrong with the inputs is known by now: write.
    os.makedirs(workdir, exist_ok=True)
    lock = run_files.WorkdirLock(workdir)
    if is_writer:
      lock.acquire()
    try:
      if is_writer:
        if config.overwrite:
          run_files.clear_run(workdir)
        run_files.write_config(config, workdir)
        run_files.write_data_description(experiment.data, workdir)
      result = train_loop(config, workdir, experiment, signals, is_writer=is_writer, invocation_start=invocation_start)
      # A signal after the last step's check (during the last evaluation, say) still asks the caller to stop:
      # a comparison must not start its next run.
      return {**result, "stopped_by": result["stopped_by"] or signals.received}
    finally:
      lock.release()
