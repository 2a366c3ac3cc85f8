"""Checks of a run's config, and of the workdir it would resume: every bad value named before anything runs.

The trainer's own fields (sizes, epochs, the schedule, paths) are checked
here; the method's arguments (rho, normalize, the AACE mode and threshold,
label smoothing) are checked by the library itself, on the objects the run
would build (`checked_method`), so there is one source for each range.
"""

import json
import math
import os
import traceback
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

import aace_jax
from train import augment
from train import input_pipeline
from train import methods
from train import models


class ConfigError(ValueError):
  """A configuration that cannot run; raised before anything is written."""


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _at_least(value, low) -> bool:
  return _is_number(value) and value >= low


def config_file_error(error: BaseException, path: str) -> str:
  """One line for `error`, raised while loading the config file `path`: the file, the line and the cause."""
  while isinstance(error, OSError) and error.__cause__ is not None:  # ml_collections wraps the first failure
    error = error.__cause__
  if isinstance(error, SyntaxError) and error.filename:
    return f"config file {error.filename}, line {error.lineno}: SyntaxError: {error.msg}"
  here = os.path.abspath(path.split(":", 1)[0])
  if not os.path.isfile(here):
    return f"config file {here} does not exist"
  frames = traceback.extract_tb(error.__traceback__)
  lines = [frame.lineno for frame in frames if os.path.abspath(frame.filename) == here]
  where = f"config file {here}" + (f", line {lines[-1]}" if lines else "")
  message = " ".join(str(error).split())  # ml_collections' messages span several lines
  return f"{where}: {type(error).__name__}: {message}"


# Old names of config fields, still taken (with a warning) into the field that replaced each.
RENAMED_FIELDS = {"optimizer": "method", "warn_perturbed_loss_ratio": "warn_loss_at_w_adv_ratio"}


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming the fields of `train/configs/default.py` that `config` lacks.

  A field under an old name (`RENAMED_FIELDS`) is taken into its new one,
  with a warning: `config.optimizer=sam` becomes `config.method=sam`.
  """
  from train.configs import default

  for old, new in RENAMED_FIELDS.items():
    if config.get(old) is not None:
      warnings.warn(
        f"config.{old} is deprecated and will be removed: it is now config.{new} (--config.{new}="
        f"{config[old]}); taking {new}={config[old]!r}.",
        FutureWarning,
        stacklevel=2,
      )
      config[new], config[old] = config[old], None

  missing = sorted(set(default.get_config()) - set(config))
  if missing:
    raise ConfigError(
      f"Bad config: it lacks the fields {', '.join(missing)}; a config starts from train/configs/default.py"
      " (config = default.get_config()) and changes only what differs."
    )


# Counts the trainer keeps in int32 (the step counter, the epoch, sizes that multiply into it).
INT32_FIELDS = (
  "batch_size",
  "eval_batch_size",
  "num_epochs",
  "grad_accum_steps",
  "log_every_steps",
  "checkpoint_max_to_keep",
  "halt_after_epochs",
  "max_consecutive_skips",
  "train_examples",
  "validation_examples",
  "test_every_epochs",
)
INT32_MAX = 2**31 - 1
# NumPy's generators take seeds >= 0, jax.random.key seeds that fit in int64.
SEED_RANGE = (0, 2**63 - 1)


def check_config(
  config: ml_collections.ConfigDict, device_count: Optional[int] = -1, *, with_the_library: bool = True
) -> None:
  """Raises `ConfigError` naming the first bad field and its value.

  Batch sizes are checked against `device_count` (default: this machine's
  devices; None skips that check, for a command checked on another machine).
  `with_the_library=False` leaves the method's arguments to a caller that
  builds the run's method anyway, with `checked_method`.
  """
  check_fields(config)
  if device_count == -1:
    device_count = jax.device_count()
  checks = [*_what_runs(config), *_how_it_trains(config)]
  if device_count is not None:
    checks += _device_split(config, device_count)
  for ok, message in checks:
    if not ok:
      raise ConfigError(f"Bad config: {message}.")
  if with_the_library:
    checked_method(config)


def _what_runs(config: ml_collections.ConfigDict) -> list:
  """`(ok, message)` for the seed, the counts, the method, data, model and sizes."""
  return [
    (
      isinstance(config.seed, int) and SEED_RANGE[0] <= config.seed <= SEED_RANGE[1],
      f"seed must be an integer in [0, 2**63 - 1], got {config.seed}",
    ),
    *(
      (
        config[field] is None or config[field] <= INT32_MAX,
        f"{field} must be at most {INT32_MAX} (2**31 - 1), got {config[field]}",
      )
      for field in INT32_FIELDS
    ),
    (
      config.method in methods.METHODS,
      f"method {config.method!r} is not one of {methods.METHODS}",
    ),
    (
      config.dataset in input_pipeline.DATASETS,
      f"dataset {config.dataset!r} is not one of {sorted(input_pipeline.DATASETS)}",
    ),
    (
      config.augment is None or config.augment in augment.AUGMENTATIONS,
      f"augment {config.augment!r} is not one of {augment.AUGMENTATIONS} (or None)",
    ),
    (
      config.train_examples is None or _at_least(config.train_examples, 1),
      f"train_examples must be >= 1 (or None), got {config.train_examples}",
    ),
    (
      config.validation_examples is None or _at_least(config.validation_examples, 1),
      f"validation_examples must be >= 1 (or None), got {config.validation_examples}",
    ),
    (
      _is_number(config.label_noise) and 0 <= config.label_noise < 1,
      f"label_noise must be a fraction in [0, 1), got {config.label_noise}",
    ),
    (
      config.label_noise_kind in input_pipeline.LABEL_NOISE_KINDS,
      f"label_noise_kind {config.label_noise_kind!r} is not one of {input_pipeline.LABEL_NOISE_KINDS}",
    ),
    (_at_least(config.test_every_epochs, 1), f"test_every_epochs must be >= 1, got {config.test_every_epochs}"),
    (config.model in models.MODELS, f"model {config.model!r} is not one of {sorted(models.MODELS)}"),
    (config.dtype in models.DTYPES, f"dtype {config.dtype!r} is not one of {sorted(models.DTYPES)}"),
    (_at_least(config.num_epochs, 1), f"num_epochs must be >= 1, got {config.num_epochs}"),
    (_at_least(config.batch_size, 1), f"batch_size must be >= 1, got {config.batch_size}"),
    (_at_least(config.eval_batch_size, 1), f"eval_batch_size must be >= 1, got {config.eval_batch_size}"),
  ]


def _how_it_trains(config: ml_collections.ConfigDict) -> list:
  """`(ok, message)` for the optimization, the cheaper steps, the guards, logging and checkpoints."""
  return [
    (
      _is_number(config.learning_rate) and config.learning_rate > 0,
      f"learning_rate must be a finite number > 0, got {config.learning_rate}",
    ),
    (_at_least(config.momentum, 0) and config.momentum < 1, f"momentum must lie in [0, 1), got {config.momentum}"),
    (_at_least(config.weight_decay, 0), f"weight_decay must be a finite number >= 0, got {config.weight_decay}"),
    (
      _is_number(config.lr_decay) and config.lr_decay > 0,
      f"lr_decay must be a finite number > 0, got {config.lr_decay}",
    ),
    (
      all(_is_number(f) and 0 < f <= 1 for f in config.lr_milestones),
      f"lr_milestones must be fractions of training in (0, 1], got {tuple(config.lr_milestones)}",
    ),
    (_at_least(config.grad_accum_steps, 1), f"grad_accum_steps must be >= 1, got {config.grad_accum_steps}"),
    (
      _is_number(config.perturbation_batch_fraction) and 0 < config.perturbation_batch_fraction <= 1,
      f"perturbation_batch_fraction must lie in (0, 1], got {config.perturbation_batch_fraction}",
    ),
    (
      config.sync_perturbation or config.perturb_every == 1 or not config.reuse_perturbation,
      "sync_perturbation=False with perturb_every > 1 and reuse_perturbation=True would keep a different"
      " perturbation on each device; use sync_perturbation=True or reuse_perturbation=False",
    ),
    (
      config.method != "sgd" or (config.perturb_every == 1 and config.perturbation_batch_fraction == 1),
      "perturb_every and perturbation_batch_fraction apply to a sharpness-aware method, not sgd; got"
      f" {config.perturb_every} and {config.perturbation_batch_fraction}",
    ),
    (
      _at_least(config.max_consecutive_skips, 1),
      f"max_consecutive_skips must be >= 1, got {config.max_consecutive_skips}",
    ),
    (
      _is_number(config.max_in_memory_gb) and config.max_in_memory_gb > 0,
      f"max_in_memory_gb must be a finite number > 0, got {config.max_in_memory_gb}",
    ),
    (_at_least(config.log_every_steps, 1), f"log_every_steps must be >= 1, got {config.log_every_steps}"),
    (
      _at_least(config.checkpoint_max_to_keep, 1),
      f"checkpoint_max_to_keep must be >= 1, got {config.checkpoint_max_to_keep}",
    ),
    (
      config.warn_loss_at_w_adv_ratio is None
      or (_is_number(config.warn_loss_at_w_adv_ratio) and 0 < config.warn_loss_at_w_adv_ratio <= 1),
      f"warn_loss_at_w_adv_ratio must lie in (0, 1] (or None), got {config.warn_loss_at_w_adv_ratio}",
    ),
    (
      config.warn_relative_perturbation is None
      or (_is_number(config.warn_relative_perturbation) and config.warn_relative_perturbation > 0),
      f"warn_relative_perturbation must be a finite number > 0 (or None), got {config.warn_relative_perturbation}",
    ),
    (
      config.halt_after_epochs is None or _at_least(config.halt_after_epochs, 1),
      f"halt_after_epochs must be >= 1 (or None), got {config.halt_after_epochs}",
    ),
  ]


def _device_split(config: ml_collections.ConfigDict, device_count: int) -> list:
  """`(ok, message)` for the batches' split over `device_count` devices and into micro-batches."""
  return [
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
    (
      _first_pass_splits(config, config.batch_size // device_count),
      f"perturbation_batch_fraction={config.perturbation_batch_fraction} of the per-device batch"
      f" {config.batch_size // device_count} does not split into grad_accum_steps={config.grad_accum_steps}"
      " micro-batches",
    ),
  ]


def _first_pass_splits(config, per_device_batch: int) -> bool:
  """Whether the first pass's part of a device's batch (as `make_train_step` takes it) splits into micro-batches."""
  if not _is_number(config.perturbation_batch_fraction) or not _at_least(config.grad_accum_steps, 1):
    return True  # reported by the field's own check
  examples = round(config.perturbation_batch_fraction * per_device_batch)
  return examples >= config.grad_accum_steps and examples % config.grad_accum_steps == 0


# The library's argument names, as the config calls them.
LIBRARY_ARGUMENTS = {
  "rho": "rho",
  "perturb_every": "perturb_every",
  "reuse_perturbation": "reuse_perturbation",
  "normalize": "normalize",
  "max_perturbation_norm": "max_perturbation_norm",
  "threshold": "aace_threshold",
  "mode": "aace_mode",
  "label_smoothing": "label_smoothing",
}


def checked_method(config: ml_collections.ConfigDict, steps_per_epoch: int = 1) -> methods.TrainingMethod:
  """The run's method, built and traced in a step abstractly: the library's checks are the only ones.

  `jax.eval_shape` traces without compiling or running anything, and every
  argument check of the transformation and the losses runs at trace time;
  a bad argument is a `ConfigError` naming the config field.
  """
  try:
    method = methods.create_training_method(config, steps_per_epoch)
    # A two-class linear model's step, traced as the run's step is: the library calls each loss as it will.
    apply_fn = lambda params, model_state, images, *, train, rng: (images @ params, model_state)
    step = aace_jax.make_train_step(
      apply_fn,
      method.tx,
      perturbation_loss=method.perturbation_loss,
      loss=method.loss,
      extra_metrics=method.aace_metrics,
    )
    make_state = lambda: aace_jax.TrainState.create(params=jnp.zeros((2, 2)), tx=method.tx, rng=jax.random.key(0))
    batch = {"image": jax.ShapeDtypeStruct((2, 2), jnp.float32), "label": jax.ShapeDtypeStruct((2,), jnp.int32)}
    jax.eval_shape(step, jax.eval_shape(make_state), batch)
  except (TypeError, ValueError) as error:
    field = LIBRARY_ARGUMENTS.get(getattr(error, "argument", None))
    raise ConfigError(f"Bad config{' field ' + field if field else ''}: {error}") from None
  return method


# Fields that may change between an interrupted run and its resumption: they
# change where the data lives and how often the run reports, not what it computes.
RESUMABLE_CHANGES = {
  "halt_after_epochs",
  "warn_loss_at_w_adv_ratio",
  "warn_relative_perturbation",
  "log_every_steps",
  "overwrite",
  "data_on_device",
  "max_in_memory_gb",
  "cache_decoded",
  "decoded_cache_dir",
  "compilation_cache",
  "compilation_cache_dir",
}


def check_resumable(config, workdir: str) -> None:
  """Refuses a workdir whose config.json holds another recipe.

  A field that the saved config lacks (one added to the trainer since the
  run started) counts as its value in `train/configs/default.py`, which is
  what the run computed without it.
  """
  from train.configs import default

  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = {**json.loads(default.get_config().to_json_best_effort()), **json.load(f)}
  current = json.loads(config.to_json_best_effort())
  differ = sorted(k for k in set(saved) | set(current) if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
  if differ:
    raise ConfigError(
      f"Bad config: {workdir} holds a run with another config (fields {', '.join(differ)} differ); use a new --workdir."
    )
