"""Trains SGD, SAM or AACE-SAM: `python train/main.py [--config FILE] [--workdir DIR]`.

With no arguments it trains a small CNN on scikit-learn's bundled digits with
AACE-SAM, offline. `--config train/configs/<name>.py` picks a paper recipe and
`--config.<field>=value` overrides a field (ml_collections); `--workdir` is
where outputs and checkpoints go (rerun the same command to resume).
"""

import os
import pathlib
import re
import sys
import time
import traceback

if __package__ in (None, ""):  # run as a script: make `train` and `aace_jax` importable
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import jax  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from train import checkpointing  # noqa: E402
from train import compilation_cache  # noqa: E402
from train import config_checks  # noqa: E402
from train import train  # noqa: E402

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parent / "configs" / "default.py")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for outputs and checkpoints; default: a new folder under ./runs/.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (auto-detected on TPU pods and SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for --multihost outside TPU/SLURM.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for --multihost outside TPU/SLURM.")
flags.DEFINE_integer("process_id", None, "This process's index, for --multihost outside TPU/SLURM.")
flags.DEFINE_bool("dry_run", False, "Check the command and the config, print the config, and exit.")
try:  # ml_collections applies --config.FIELD overrides here, as the flag is defined
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "A config file with get_config().", lock_config=True)
except (KeyError, AttributeError) as unknown_field:
  suggestion = re.search(r"Did you mean \S+ instead of \S+\?", str(unknown_field))
  sys.exit(
    f"error: unknown config field in {' '.join(a for a in sys.argv[1:] if a.startswith('--config'))}"
    f"{'; ' + suggestion.group(0) if suggestion else ''}"
  )


def cluster_detected() -> bool:
  """True on a multi-process TPU slice or SLURM job, where JAX must be initialized first."""
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in tpu_hosts or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep orbax's per-save INFO lines out of the progress output
  try:
    config = FLAGS.config
    config_checks.check_fields(config)  # also makes ml_collections report a file it could not load
  except config_checks.ConfigError as error:
    sys.exit(f"error: {error}")
  except Exception as error:  # whatever the config file raised
    sys.exit(f"error: {config_checks.config_file_error(error, config_path(sys.argv))}")
  if FLAGS.dry_run:
    try:
      config_checks.check_config(config, device_count=None)
    except config_checks.ConfigError as error:
      sys.exit(f"error: {error}")
    print(config)
    return
  if FLAGS.multihost or cluster_detected():
    # CPU collectives across processes need gloo; accelerators ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  workdir = FLAGS.workdir or os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{config.dataset}-{config.method}")
  logging.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(), jax.device_count())
  cache_dir = compilation_cache.enable(config)
  logging.info("compilation cache: %s", cache_dir)
  start = time.time()
  try:
    result = train.train_and_evaluate(config, workdir)
  except checkpointing.CheckpointWriteError as error:
    train.exit_now(f"error: {error}")  # orbax's threads for later writes would keep the process alive
  except train.RUN_ERRORS as error:
    sys.exit(f"error: {error}")
  except OSError as error:  # the workdir or the data: a path and its cause, in one line
    train.exit_now(f"error: {error.strerror or error} ({error.filename or workdir})")
  if jax.process_index() != 0:
    return
  where = f"workdir {os.path.abspath(workdir)}"
  if result["stopped_by"] in train.SIGNAL_STOPS and not result["finished"]:
    train.ignore_stop_signals()
    print(
      f"stopped by {result['stopped_by']} at step {result['step']}, checkpoint written;"
      f" rerun the same command to resume. {where}"
    )
  elif result.get("epoch") is None:
    print(f"nothing to train: the run is complete. {where}")
  else:
    state = "finished" if result["finished"] else f"halted after epoch {int(result['epoch']) + 1}, rerun to resume"
    print(
      f"{state}: test accuracy {result['val_acc']:.4f} ({config.method} on {config.dataset},"
      f" {config.model}) in {time.time() - start:.1f} s; {where}"
    )


def config_path(argv) -> str:
  """The `--config` file named in `argv` (the default config when none is)."""
  for index, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and index + 1 < len(argv):
      return argv[index + 1]
  return DEFAULT_CONFIG


def parse_flags(argv):
  """absl's flag parsing, with a bad flag, config field (a typo, say) or config file reported in one line."""
  try:
    return FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as error:
    config_file = os.path.abspath(config_path(argv).split(":", 1)[0])
    if not isinstance(error, flags.Error) and config_file in "".join(traceback.format_tb(error.__traceback__)):
      sys.exit(f"error: {config_checks.config_file_error(error, config_path(argv))}")
    message = str(error).strip().splitlines()
    sys.exit(f"error: {message[-1] if message else type(error).__name__}")
  except Exception as error:  # raised by the config file itself: a syntax error, an exception in get_config
    sys.exit(f"error: {config_checks.config_file_error(error, config_path(argv))}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
