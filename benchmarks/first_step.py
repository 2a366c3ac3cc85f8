"""Time to the first step: parameter init, trace, lowering and compile of the trainer's step, cold and cached.

    python benchmarks/first_step.py --model wrn28_10 --batch 256 --json
    python benchmarks/first_step.py --model pyramidnet272 --batch 64 --method aace_sam --json

Each measurement runs in a fresh process (nothing compiled in memory), twice
over one new persistent compilation cache: `cold` fills it, `cached` is what
a resumed run pays. A process starts as `train.train_and_evaluate` does:
it builds the experiment (`setup_seconds`: the data, the model, the state's
shapes), starts compiling the step from those shapes in a thread
(`train.compile_train_step_ahead`) while it initializes the parameters
(`init_seconds`, which a resumed run skips), waits for the compile
(`ready_seconds`: from the start until the step can run) and runs the step
once (`step_seconds`). `trace_seconds`, `lower_seconds` and
`compile_seconds` are the step's own phases as jax reports them; they
overlap the init (`--sequential` compiles first and initializes after).
`first_call_compiles` counts compiles of the step by its first call (0: it
found the executable compiled ahead). The last line printed is a JSON
object; `cache_entries` counts the cache's files after each process, so an
unchanged count means the cached run compiled nothing new.
"""

import argparse
import collections
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import timing  # noqa: E402 (a sibling module, importable once its folder is on the path)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="wrn16_4", help="a model name of train/models.py")
  timing.add_method_argument(parser, default="aace_sam")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--dataset", default="cifar100", help="the shape and classes of the inputs")
  parser.add_argument("--cache_dir", help="an existing compilation cache to use (default: a new, empty one)")
  parser.add_argument("--sequential", action="store_true", help="compile the step, then initialize (no overlap)")
  parser.add_argument("--json", action="store_true", help="print only the JSON object")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one timed process
  args = parser.parse_args(argv)
  timing.take_old_method(args)
  if args.batch < 1:
    parser.error(f"--batch must be positive, got {args.batch}")
  return args


def one_process(args) -> dict:
  """The phases of one fresh process, in seconds, with the compilation cache's hits and misses."""
  start = time.perf_counter()
  import jax
  import numpy as np

  from train import compilation_cache
  from train import input_pipeline
  from train import train
  from train.configs import default

  config = default.get_config()
  config.dataset, config.model, config.method, config.dtype = args.dataset, args.model, args.method, args.dtype
  config.batch_size = config.eval_batch_size = args.batch
  config.compilation_cache_dir = args.cache_dir
  compilation_cache.enable(config)
  spec = input_pipeline.get_spec(args.dataset)
  rng = np.random.default_rng(0)
  split = input_pipeline.Split(
    rng.integers(0, 256, (args.batch, *spec.image_shape), dtype=np.uint8),
    rng.integers(0, spec.num_classes, args.batch).astype(np.int32),
  )
  data = input_pipeline.Data(spec, split, split, args.batch, args.batch, 0, spec.mean or (0.5,), spec.std or (0.25,))
  phases = {"import_seconds": time.perf_counter() - start}
  step_events = collections.defaultdict(list)  # the step's trace, lower and compile events, in order
  step_names = ("host_fed_step", "jit(host_fed_step)")

  def record(event, duration, *, fun_name="", **kwargs):
    if fun_name in step_names:
      step_events[event.rsplit("/", 1)[1]].append(duration)

  jax.monitoring.register_event_duration_secs_listener(record)

  def timed(name, fn):
    begin = time.perf_counter()
    result = fn()
    phases[name] = time.perf_counter() - begin
    return result

  experiment = timed("setup_seconds", lambda: train.create_experiment(config, data))
  compiling = train.compile_train_step_ahead(experiment)
  if args.sequential:
    compiling.result()
  state = timed("init_seconds", lambda: jax.block_until_ready(experiment.init_state()))
  compiling.result()
  phases["ready_seconds"] = time.perf_counter() - start
  compiled_ahead = len(step_events["backend_compile_duration"])
  batch = next(iter(experiment.train_batches(0, 0)))
  timed("step_seconds", lambda: jax.block_until_ready(experiment.train_step(state, experiment.totals, batch)))
  phases["first_step_seconds"] = time.perf_counter() - start
  for name, event in (("trace", "jaxpr_trace_duration"), ("lower", "jaxpr_to_mlir_module_duration")):
    phases[f"{name}_seconds"] = step_events[event][0]
  phases["compile_seconds"] = step_events["backend_compile_duration"][0]
  return {
    **{k: round(v, 3) for k, v in phases.items()},
    "cache_hits": compilation_cache.events["cache_hits"],
    "cache_misses": compilation_cache.events["cache_misses"],
    "first_call_compiles": len(step_events["backend_compile_duration"]) - compiled_ahead,
    "overlapped": not args.sequential,
    "device": jax.devices()[0].device_kind,
    "backend": jax.default_backend(),
  }


def run_child(args, cache_dir: str) -> dict:
  command = [
    sys.executable,
    __file__,
    "--child",
    "--model",
    args.model,
    "--method",
    args.method,
    "--dtype",
    args.dtype,
    "--batch",
    str(args.batch),
    "--dataset",
    args.dataset,
    "--cache_dir",
    cache_dir,
    *(["--sequential"] if args.sequential else []),
  ]
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode != 0:
    raise SystemExit(f"the timed process failed:\n{result.stderr[-3000:]}")
  report = json.loads(result.stdout.strip().splitlines()[-1])
  report["cache_entries"] = len(os.listdir(cache_dir))
  return report


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    print(json.dumps(one_process(args)))
    return
  with tempfile.TemporaryDirectory() as fresh:
    cache_dir = args.cache_dir or fresh
    cold = run_child(args, cache_dir)
    cached = run_child(args, cache_dir)
  report = {
    "model": args.model,
    "method": args.method,
    "dtype": args.dtype,
    "batch": args.batch,
    "dataset": args.dataset,
    "cold": cold,
    "cached": cached,
  }
  if not args.json:
    for name in ("cold", "cached"):
      print(name, ", ".join(f"{k} {v}" for k, v in report[name].items()))
  print(json.dumps(report))


if __name__ == "__main__":
  main()
