"""Trains SGD, SAM or AACE-SAM: `python train/main.py [--config FILE] [--workdir DIR]`.

With no arguments it trains a small CNN on scikit-learn's bundled digits with
AACE-SAM, offline. `--config train/configs/<name>.py` picks a paper recipe and
`--config.<field>=value` overrides a field (ml_collections); `--workdir` is
where outputs and checkpoints go (rerun the same command to resume).
"""

import os
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make `train` and `aace_jax` importable
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import jax  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from train import checkpointing  # noqa: E402
from train import command_line  # noqa: E402
from train import compilation_cache  # noqa: E402
from train import config_checks  # noqa: E402
from train import train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for outputs and checkpoints; default: a new folder under ./runs/.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (auto-detected on TPU pods and SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for --multihost outside TPU/SLURM.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for --multihost outside TPU/SLURM.")
flags.DEFINE_integer("process_id", None, "This process's index, for --multihost outside TPU/SLURM.")
flags.DEFINE_bool("dry_run", False, "Check the command and the config, print the config, and exit.")
command_line.define_config_flag("A config file with get_config().")


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
    sys.exit(f"error: {config_checks.config_file_error(error, command_line.config_path(sys.argv))}")
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


if __name__ == "__main__":
  app.run(main, flags_parser=command_line.parse_flags)
