"""Where a training run's time goes, and what running several seeds at once buys on this machine.

    python benchmarks/run_time.py breakdown --config train/configs/label_noise.py:0.4 --epochs 5
    python benchmarks/run_time.py seeds --config train/configs/label_noise.py:0.4 --seeds 2,4,8
    python benchmarks/run_time.py processes --config train/configs/label_noise.py:0.4

`breakdown` runs `train.train_and_evaluate` on the config for `--epochs`
epochs in a fresh workdir and times each part of it from inside: the
process's imports, the start-up before the first step (data, model, init,
compile), the training steps, the evaluation of each split, the checkpoint
saves (the part the loop waits for, and the wait at the end), the CSV rows,
the TensorBoard events and the plots; what is left is the loop's own
bookkeeping.

`seeds` times S seeds of one method in one compiled program: the step
`jax.vmap`ped over the train state, every seed on the same batch or each on
its own, against one seed's step, all jitted and timed round-robin in one
process (`benchmarks/timing.py`); reported per seed, relative to one seed's
step.

`processes` times the same number of steps of one seed in one process with
every core, then in one process per core (each pinned to its core and
limited to one XLA thread) all at once, and reports the steps per second of
the machine in each case.

Every figure is the median of `--rounds` rounds; each mode prints a markdown
table, or one JSON object with `--json`.
"""

import argparse
import ast
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

PROCESS_START = time.perf_counter()
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import timing  # noqa: E402 (a sibling module, importable once its folder is on the path)

# As train/compare.py's --jobs workers run.
SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("mode", choices=("breakdown", "seeds", "processes"))
  parser.add_argument("--config", default="train/configs/label_noise.py:0.4", help="FILE[:ARGUMENT] of a config")
  parser.add_argument("--method", default="sam", help="the config's method for the run (sgd, sam, aace_sam, asam)")
  parser.add_argument("--epochs", type=int, default=5, help="breakdown: epochs of the run")
  parser.add_argument(
    "--set", action="append", default=[], metavar="FIELD=VALUE", help="breakdown: a config change (repeatable)"
  )
  parser.add_argument("--seeds", default="2,4,8", help="seeds: the numbers of vmapped seeds to time")
  parser.add_argument("--rounds", type=int, default=20, help="seeds, processes: timed steps per variant")
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # processes: one timed process
  parser.add_argument("--barrier", help=argparse.SUPPRESS)  # processes: where the workers say they are ready
  parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)  # processes: how many there are
  args = parser.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(",")]
  if args.epochs < 1 or args.rounds < 1 or min(args.seeds) < 1:
    parser.error(f"--epochs, --rounds and --seeds must be positive, got {args.epochs}, {args.rounds}, {args.seeds}")
  return args


def load_config(spec: str, method: str, **changes):
  """The config of `FILE[:ARGUMENT]`, with `method` and `changes`."""
  import importlib.util

  path, _, argument = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("benchmarked_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(argument) if argument else module.get_config()
  config.method = method
  config.update(changes)
  return config


class Stopwatch:
  """Seconds spent in chosen functions, summed by name: each wrapped in place for the run's duration."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self._restore = []

  def wrap(self, owner, attribute: str, name: str) -> None:
    original = getattr(owner, attribute)

    def timed(*args, **kwargs):
      start = time.perf_counter()
      try:
        return original(*args, **kwargs)
      finally:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    setattr(owner, attribute, timed)
    self._restore.append((owner, attribute, original))

  def unwrap(self) -> None:
    for owner, attribute, original in reversed(self._restore):
      setattr(owner, attribute, original)


def breakdown(args) -> dict:
  """Seconds of each part of a run of `args.epochs` epochs (see the module docstring)."""
  from train import checkpointing
  from train import input_pipeline
  from train import run_files
  from train import train

  imports = time.perf_counter() - PROCESS_START
  changes = {field: ast.literal_eval(value) for field, _, value in (change.partition("=") for change in args.set)}
  config = load_config(args.config, args.method, **{"num_epochs": args.epochs, "compilation_cache": False, **changes})
  watch = Stopwatch()
  evaluated_split = []  # the split of the evaluation about to run: Data.evaluation_batches is called just before

  def named_evaluation_batches(data, split):
    evaluated_split.append("test" if split is data.eval else "validation")
    return evaluation_batches(data, split)

  watch.wrap(checkpointing.Checkpoints, "save", "checkpoint saves")
  watch.wrap(checkpointing.Checkpoints, "wait", "checkpoint waits")
  watch.wrap(run_files.RunFiles, "plot", "plots")
  watch.wrap(run_files.RunFiles, "write_events", "TensorBoard events")
  watch.wrap(run_files.RunFiles, "write_csv_row", "CSV rows")
  evaluate, close = train.evaluate, train.EpochLog.close
  evaluation_batches = input_pipeline.Data.evaluation_batches
  epochs = []  # (start, seconds) of each epoch's steps

  def timed_evaluate(*arguments):
    begin = time.perf_counter()
    try:
      return evaluate(*arguments)
    finally:
      name = f"evaluation of the {evaluated_split[-1]} split"
      watch.seconds[name] = watch.seconds.get(name, 0.0) + time.perf_counter() - begin

  def timed_close(log):
    close(log)
    epochs.append((log.start, log.train_seconds))

  train.evaluate, train.EpochLog.close = timed_evaluate, timed_close
  input_pipeline.Data.evaluation_batches = named_evaluation_batches
  try:
    with tempfile.TemporaryDirectory() as workdir:
      invocation_start = time.time()
      result = train.train_and_evaluate(config, workdir)
      total = time.time() - invocation_start
  finally:
    train.evaluate, train.EpochLog.close = evaluate, close
    input_pipeline.Data.evaluation_batches = evaluation_batches
    watch.unwrap()
  parts = dict(watch.seconds)
  # The start-up ends with the first step, which the first epoch's step time holds too.
  first_step_end = invocation_start + result["first_step_seconds"]
  parts["start-up (data, model, init, compile, first step)"] = result["first_step_seconds"]
  parts["training steps after the first"] = sum(seconds for _, seconds in epochs) - (first_step_end - epochs[0][0])
  parts["imports"] = imports
  parts["other (the loop's own bookkeeping)"] = imports + total - sum(parts.values())
  return {
    "mode": "breakdown",
    "config": args.config,
    "method": args.method,
    "changes": args.set,
    "epochs": args.epochs,
    "steps": int(result["step"]),
    "total_seconds": imports + total,
    "seconds": parts,
  }


def breakdown_table(report: dict) -> str:
  total = report["total_seconds"]
  lines = [
    f"{report['config']} {' '.join(report['changes'])}, {report['method']}, {report['epochs']} epochs"
    f" ({report['steps']} steps):"
    f" {total:.1f} s in all",
    "",
    "| part | seconds | share |",
    "| --- | --- | --- |",
  ]
  for part, seconds in sorted(report["seconds"].items(), key=lambda item: -item[1]):
    lines.append(f"| {part} | {seconds:.2f} | {100 * seconds / total:.1f}% |")
  return "\n".join(lines)


def seed_step(config, seeds: Optional[int], same_batch: bool):
  """`(jitted step, states, batch)`: one seed's train step of `config`, or `seeds` of them under `jax.vmap`."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import aace_jax
  from train import input_pipeline
  from train import methods
  from train import models

  spec = input_pipeline.get_spec(config.dataset)
  method = methods.create_training_method(config, steps_per_epoch=100)
  model = models.create_model(config.model, spec.num_classes)
  step = aace_jax.make_train_step(
    aace_jax.linen_apply_fn(model), method.tx, perturbation_loss=method.perturbation_loss, loss=method.loss
  )

  def init(key):
    variables = dict(model.init(key, jnp.zeros((1, *spec.image_shape)), train=False))
    params = variables.pop("params")
    return aace_jax.TrainState.create(params=params, model_state=variables, tx=method.tx, rng=key)

  rng = np.random.default_rng(0)
  copies = 1 if seeds is None or same_batch else seeds
  batch = {
    "image": jnp.asarray(rng.normal(size=(copies, config.batch_size, *spec.image_shape)), jnp.float32),
    "label": jnp.asarray(rng.integers(0, spec.num_classes, (copies, config.batch_size)), jnp.int32),
  }
  if seeds is None:
    batch = jax.tree.map(lambda x: x[0], batch)
    return jax.jit(step, donate_argnums=0), jax.jit(init)(jax.random.key(0)), batch
  if same_batch:
    batch = jax.tree.map(lambda x: x[0], batch)
  states = jax.jit(jax.vmap(init))(jax.random.split(jax.random.key(0), seeds))
  return jax.jit(jax.vmap(step, in_axes=(0, None if same_batch else 0)), donate_argnums=0), states, batch


def timed_steps(variants: dict, rounds: int) -> dict:
  """Median seconds per step of each `(step, state, batch)`, warmed up, then timed round-robin."""
  times, _ = timing.time_cycles(
    {name: ((step,), state, batch) for name, (step, state, batch) in variants.items()}, rounds
  )
  return {name: statistics.median(seconds) for name, seconds in times.items()}


def vmapped_seeds(args) -> dict:
  """Seconds per step of one seed, and of S seeds vmapped (same batch, own batches), per seed."""
  import jax

  config = load_config(args.config, args.method)
  variants = {"one seed": seed_step(config, None, True)}
  for seeds in args.seeds:
    variants[f"{seeds} seeds, same batch"] = seed_step(config, seeds, True)
    variants[f"{seeds} seeds, own batches"] = seed_step(config, seeds, False)
  medians = timed_steps(variants, args.rounds)
  per_seed = {name: seconds / (1 if name == "one seed" else int(name.split()[0])) for name, seconds in medians.items()}
  return {
    "mode": "seeds",
    "config": args.config,
    "method": args.method,
    "backend": jax.default_backend(),
    "device": jax.devices()[0].device_kind,
    "cores": len(os.sched_getaffinity(0)),
    "seconds_per_step": medians,
    "seconds_per_seed_step": per_seed,
  }


def seeds_table(report: dict) -> str:
  one = report["seconds_per_seed_step"]["one seed"]
  lines = [
    f"{report['config']}, {report['method']}, {report['backend']} ({report['device']}, {report['cores']} cores)",
    "",
    "| variant | s/step | s/step per seed | per seed x one seed |",
    "| --- | --- | --- | --- |",
  ]
  for name, seconds in report["seconds_per_step"].items():
    per_seed = report["seconds_per_seed_step"][name]
    lines.append(f"| {name} | {seconds:.4f} | {per_seed:.4f} | {per_seed / one:.2f} |")
  return "\n".join(lines)


def process_worker(args) -> dict:
  """In a child: one seed's step, timed once every worker is ready (files in `args.barrier`)."""
  config = load_config(args.config, args.method)
  import jax

  step, state, batch = seed_step(config, None, True)
  state, metrics = step(state, batch)  # compile before the others start timing
  jax.block_until_ready((state, metrics))
  pathlib.Path(args.barrier, f"ready-{os.getpid()}").touch()
  while len(os.listdir(args.barrier)) < args.workers:
    time.sleep(0.05)
  return {"seconds_per_step": timed_steps({"step": (step, state, batch)}, args.rounds)["step"]}


def processes(args) -> dict:
  """Steps per second of the machine: one process on every core, then one single-threaded process per core."""
  cores = sorted(os.sched_getaffinity(0))
  flags = f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_XLA_FLAGS}".strip()
  layouts = {"one process, every core": [(None, os.environ.get("XLA_FLAGS", ""))]}
  layouts[f"{len(cores)} processes, one core and one thread each"] = [({core}, flags) for core in cores]
  results = {}
  for name, workers in layouts.items():
    with tempfile.TemporaryDirectory() as barrier:
      command = [sys.executable, __file__, "processes", "--worker", "--config", args.config, "--method", args.method]
      command += ["--rounds", str(args.rounds), "--barrier", barrier, "--workers", str(len(workers))]
      children = [
        subprocess.Popen(
          command,
          stdout=subprocess.PIPE,
          text=True,
          env={**os.environ, "XLA_FLAGS": xla_flags},
          preexec_fn=None if core is None else (lambda core=core: os.sched_setaffinity(0, core)),
        )
        for core, xla_flags in workers
      ]
      seconds = [json.loads(child.communicate()[0].strip().splitlines()[-1])["seconds_per_step"] for child in children]
    results[name] = {"seconds_per_step": seconds, "steps_per_second": sum(1 / s for s in seconds)}
  return {"mode": "processes", "config": args.config, "method": args.method, "cores": len(cores), "results": results}


def processes_table(report: dict) -> str:
  first = next(iter(report["results"].values()))["steps_per_second"]
  lines = [
    f"{report['config']}, {report['method']}, {report['cores']} cores",
    "",
    "| layout | s/step of each process | steps/s of the machine | x one process |",
    "| --- | --- | --- | --- |",
  ]
  for name, result in report["results"].items():
    each = ", ".join(f"{s:.4f}" for s in result["seconds_per_step"])
    lines.append(f"| {name} | {each} | {result['steps_per_second']:.2f} | {result['steps_per_second'] / first:.2f} |")
  return "\n".join(lines)


MODES = {
  "breakdown": (breakdown, breakdown_table),
  "seeds": (vmapped_seeds, seeds_table),
  "processes": (processes, processes_table),
}


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    print(json.dumps(process_worker(args)))
    return
  measure, table = MODES[args.mode]
  report = measure(args)
  print(json.dumps(report) if args.json else table(report))


if __name__ == "__main__":
  main()
