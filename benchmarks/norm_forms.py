"""Compile time and step time of the AACE-SAM step with its global norms and checks in each form.

    python benchmarks/norm_forms.py --models pyramidnet272,wrn28_10 --batch 8 --json

`aace_jax`'s global norms and non-finite checks either reduce vectors of
concatenated leaves, 32 leaves each (`chunks_of_32`, what a lone CPU device
gets), or reduce each leaf and combine the scalars (`per_leaf`, what every
other platform and any sharded state gets); `one_vector` concatenates every
leaf into one vector (the library's CPU form before the chunks). For each
model and form, a fresh process (no compilation cache, nothing compiled in
memory) builds the jitted, donating AACE-SAM step of `benchmarks/step_time.py` (guarded,
SGD with momentum and weight decay as the base), times its trace and
lowering and its compile, and then its steps: the median of `--steps` after
one warm-up step. `fusions` counts the compiled program's fusion
computations, the kernels XLA generates code for. The last line printed is a
JSON object.
"""

import argparse
import json
import pathlib
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

FORMS = ("chunks_of_32", "one_vector", "per_leaf")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(
    "--models", type=lambda text: text.split(","), default=["pyramidnet272", "wrn28_10"], help="train/models.py names"
  )
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
  parser.add_argument("--num_classes", type=int, default=100)
  parser.add_argument("--forms", type=lambda text: text.split(","), default=list(FORMS), help=f"a subset of {FORMS}")
  parser.add_argument("--json", action="store_true", help="print only the JSON object")
  parser.add_argument("--form", choices=FORMS, help=argparse.SUPPRESS)  # one model and form, in a child
  args = parser.parse_args(argv)
  if args.batch < 1 or args.steps < 1:
    parser.error(f"--batch and --steps must be positive, got {args.batch} and {args.steps}")
  unknown = [form for form in args.forms if form not in FORMS]
  if unknown:
    parser.error(f"--forms must name forms of {FORMS}, got {','.join(unknown)}")
  return args


def one_form(args) -> dict:
  """Seconds to trace and lower, compile and run the step of `args.models[0]` with the norms in `args.form`."""
  import jax
  import step_time

  from aace_jax import _norms

  # The form is decided when the step is traced; fix it for this process.
  _norms.concatenates = lambda: args.form != "per_leaf"
  if args.form == "one_vector":
    _norms.CHUNK_LEAVES = 2**31
  step_args = argparse.Namespace(
    model=args.models[0], num_classes=args.num_classes, dtype="float32", batch=args.batch, image_size=32
  )
  (step,), state, batch = step_time.build_step(step_args, "aace_sam")
  start = time.perf_counter()
  lowered = step.trace(state, batch).lower()
  traced = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  fusions = len(re.findall(r" fusion\(.*calls=", compiled.as_text()))
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    start_step = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start_step)
  return {
    "trace_and_lower_seconds": traced - start,
    "compile_seconds": done - traced,
    "step_seconds": statistics.median(times),
    "fusions": fusions,
    "parameter_leaves": len(jax.tree.leaves(state.params)),
    "loss_finite": bool(jax.numpy.isfinite(metrics["loss"])),
  }


def run_all(args) -> dict:
  import jax

  report = {
    "machine": f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {jax.device_count()} device(s)",
    "jax": jax.__version__,
    "batch": args.batch,
    "steps": args.steps,
    "models": {},
  }
  for model in args.models:
    report["models"][model] = {}
    for form in args.forms:
      command = [sys.executable, __file__, "--models", model, "--batch", str(args.batch), "--steps", str(args.steps)]
      command += ["--num_classes", str(args.num_classes), "--form", form]
      child = subprocess.run(command, capture_output=True, text=True, check=False)
      if child.returncode:
        raise SystemExit(f"norm_forms: {model} {form} failed:\n{child.stderr[-3000:]}")
      report["models"][model][form] = json.loads(child.stdout.splitlines()[-1])
      if not args.json:
        print(model, form, report["models"][model][form], flush=True)
  return report


def main(argv=None):
  args = parse_args(argv)
  if args.form:
    print(json.dumps(one_form(args)))
    return
  print(json.dumps(run_all(args)))


if __name__ == "__main__":
  main()
