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
import json
import pathlib
import sys
import tempfile
import time

PROCESS_START = time.perf_counter()
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("mode", choices=("breakdown", "seeds", "processes"))
  parser.add_argument("--config", default="train/configs/label_noise.py:0.4", help="FILE[:ARGUMENT] of a config")
  parser.add_argument("--method", default="sam", help="the config's method for the run (sgd, sam, aace_sam, asam)")
  parser.add_argument("--epochs", type=int, default=5, help="breakdown: epochs of the run")
  parser.add_argument("--seeds", default="2,4,8", help="seeds: the numbers of vmapped seeds to time")
  parser.add_argument("--rounds", type=int, default=20, help="seeds, processes: timed steps per variant")
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # processes: one timed process
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
  config = load_config(args.config, args.method, num_epochs=args.epochs, compilation_cache=False)
  watch = Stopwatch()
  evaluated_split = []  # the split of the evaluation about to run: Data.evaluation_batches is called just before

  def named_evaluation_batches(data, split):
    evaluated_split.append("test" if split is data.eval else "validation")
    return evaluation_batches(data, split)

  watch.wrap(checkpointing.Checkpoints, "save", "checkpoint saves")
  watch.wrap(checkpointing.Checkpoints, "wait", "checkpoint waits")
  watch.wrap(run_files.RunFiles, "plot", "plots")
  watch.wrap(run_files.RunFiles, "write_events", "TensorBoard events")
  watch.wrap(run_files.RunFiles, "append", "rows")
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
  parts["CSV rows"] = parts.pop("rows") - parts.get("plots", 0.0) - parts.get("TensorBoard events", 0.0)
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
    "epochs": args.epochs,
    "steps": int(result["step"]),
    "total_seconds": imports + total,
    "seconds": parts,
  }


def breakdown_table(report: dict) -> str:
  total = report["total_seconds"]
  lines = [
    f"{report['config']}, {report['method']}, {report['epochs']} epochs ({report['steps']} steps):"
    f" {total:.1f} s in all",
    "",
    "| part | seconds | share |",
    "| --- | --- | --- |",
  ]
  for part, seconds in sorted(report["seconds"].items(), key=lambda item: -item[1]):
    lines.append(f"| {part} | {seconds:.2f} | {100 * seconds / total:.1f}% |")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  report = {"breakdown": breakdown}[args.mode](args)
  print(json.dumps(report) if args.json else {"breakdown": breakdown_table}[args.mode](report))


if __name__ == "__main__":
  main()
