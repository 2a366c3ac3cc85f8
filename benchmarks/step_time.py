"""Seconds per training step: SGD, SAM, AACE-SAM, AACE-SAM built on optax.contrib.sam, and AACE-SAM's cheaper steps.

    python benchmarks/step_time.py --model wrn16_4 --batch 128 --steps 8 --json
    python benchmarks/step_time.py --model wrn28_10 --batch 256 --dtype bfloat16

All methods use the same model, batch, dtype and data; the step is the full
jitted `aace_jax.make_train_step` with buffers donated. The cheaper steps:
`aace_sam_k{2,4,8}` computes a new perturbation every k steps and reuses it
between (`perturb_every=k`, as `make_train_step(...).jit()` runs it: a
`CompiledStep` of two programs, picked on the host, as the trainer does),
`aace_sam_f{0.25,0.5}` takes the first pass on that part of the batch
(`perturbation_batch_fraction`); `aace_sam_k4_jit` is `perturb_every=4` as
`jax.jit(make_train_step(...))` compiles it, one program (on a CPU the first
pass runs every step, its results kept where they are due);
`aace_sam_k4_cond` is that one program with its first pass in a
`jax.lax.cond` (`conditional_first_pass=True`, the default off the CPU);
`aace_sam_unguarded` is AACE-SAM without the non-finite guard
(`skip_nonfinite=False`). Reported: seconds per step, the median over
the `--steps` rounds after two warm-up steps (compilation excluded) of the
mean step time of each complete k-step cycle (one step for the others), the
methods timed round-robin, one step each per round, in one process so that
drifts of the machine hit all of them alike; and, where the backend reports it
(GPU/TPU, not CPU), the peak device memory of each method measured alone in a
child process. `--methods` times a subset.
"""

import argparse
import concurrent.futures
import json
import os
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import timing  # noqa: E402 (a sibling module, importable once its folder is on the path)

METHODS = (
  "sgd",
  "sam",
  "aace_sam",
  "optax_contrib_sam",
  "aace_sam_unguarded",
  "aace_sam_k2",
  "aace_sam_k4",
  "aace_sam_k8",
  "aace_sam_k4_jit",
  "aace_sam_k4_cond",
  "aace_sam_f0.25",
  "aace_sam_f0.5",
)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="wrn16_4", help="a model name of train/models.py")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=8, help="timed steps per method (rounds)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="computation dtype")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--num_classes", type=int, default=100)
  parser.add_argument("--methods", type=lambda text: text.split(","), default=list(METHODS), help="a subset, sgd first")
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # peak memory of one method, in a child
  args = parser.parse_args(argv)
  if args.batch < 1 or args.steps < 1:
    parser.error(f"--batch and --steps must be positive, got {args.batch} and {args.steps}")
  unknown = [method for method in args.methods if method not in METHODS]
  if unknown or args.methods[:1] != ["sgd"]:
    parser.error(f"--methods must start with sgd and name methods of {METHODS}, got {','.join(args.methods)}")
  return args


def optax_contrib_aace_sam(optimizer, rho):
  """AACE-SAM from optax.contrib.sam's opaque mode, fed by make_train_step's grad_fn.

  That grad_fn takes the parameters alone and returns (loss, gradient);
  optax.contrib.sam calls grad_fn(params, step) and wants the gradient.
  """
  import optax

  contrib = optax.contrib.sam(optimizer, optax.scale(rho), sync_period=2, opaque_mode=True)

  def update(updates, state, params=None, *, grad_fn, **extra_args):
    del extra_args
    return contrib.update(updates, state, params, grad_fn=lambda w, _: grad_fn(w)[1])

  return optax.GradientTransformationExtraArgs(contrib.init, update)


def build_step(args, method):
  """The jitted, donating train steps of `method`, in the order of one cycle, and its initial state and batch."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import aace_jax
  from train import models

  base = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  every, fraction = 1, 1.0
  if method.startswith("aace_sam_k"):
    every = int(method.removeprefix("aace_sam_k").removesuffix("_cond").removesuffix("_jit"))
  elif method.startswith("aace_sam_f"):
    fraction = float(method.removeprefix("aace_sam_f"))
  tx, perturbation_loss = {
    "sgd": (base, aace_jax.aace_cross_entropy),
    "sam": (aace_jax.sam(base, 0.05), aace_jax.cross_entropy),
    "optax_contrib_sam": (optax_contrib_aace_sam(base, 0.2), aace_jax.aace_cross_entropy),
  }.get(method, (aace_jax.aace_sam(base, 0.2, perturb_every=every if every > 1 else None), aace_jax.aace_cross_entropy))
  model = models.create_model(args.model, args.num_classes, jnp.dtype(args.dtype))
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(rng.normal(size=(args.batch, args.image_size, args.image_size, 3)), jnp.float32),
    "label": jnp.asarray(rng.integers(0, args.num_classes, args.batch), jnp.int32),
  }
  variables = jax.jit(lambda key: model.init(key, batch["image"][:1], train=False))(jax.random.key(0))
  state = aace_jax.TrainState.create(
    params=variables["params"], model_state={"batch_stats": variables["batch_stats"]}, tx=tx, rng=jax.random.key(1)
  )

  step = aace_jax.make_train_step(
    aace_jax.linen_apply_fn(model),
    tx,
    perturbation_loss=perturbation_loss,
    perturbation_batch_fraction=fraction,
    conditional_first_pass=True if method.endswith("_cond") else None,
    skip_nonfinite=method != "aace_sam_unguarded",
  )
  if every == 1 or method.endswith(("_cond", "_jit")):  # one program: its state's counter decides, on the device
    return (jax.jit(step, donate_argnums=0),) * every, state, batch
  # Two programs, picked on the host from the state's counter.
  return (step.jit(donate_argnums=0),) * every, state, batch


def time_methods(args) -> dict:
  """Median seconds per step of every method, timed round-robin in this process (`timing.round_robin`)."""
  import jax
  import numpy as np

  import aace_jax

  runs = {method: build_step(args, method) for method in args.methods}
  # XLA compiles outside Python's lock: every program at once, and each call finds its executable compiled.
  programs = {
    id(program): (program, state, batch)
    for cycle, state, batch in runs.values()
    for step in cycle
    for program in ((step.program(True), step.program(False)) if isinstance(step, aace_jax.CompiledStep) else (step,))
  }
  with concurrent.futures.ThreadPoolExecutor(min(len(programs), os.cpu_count() or 1)) as pool:
    list(pool.map(lambda program: program[0].lower(*program[1:]).compile(), programs.values()))
  times, states = timing.time_cycles(runs, args.steps)
  device = jax.devices()[0]
  return {
    "backend": jax.default_backend(),
    "device": device.device_kind,
    "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(states["sgd"].params))),
    "results": {method: per_step_seconds(times[method], len(runs[method][0])) for method in args.methods},
    "memory_reported": device.memory_stats() is not None,
  }


def per_step_seconds(times: list, cycle: int) -> float:
  """The median over complete cycles of their mean step time (with one-step cycles, the median step time)."""
  cycles = [times[start : start + cycle] for start in range(0, len(times) - cycle + 1, cycle)]
  if not cycles:
    raise SystemExit(f"--steps {len(times)} holds no complete cycle of {cycle} steps: give at least {cycle}")
  return statistics.median(sum(c) / cycle for c in cycles)


def peak_memory_of_one_method(args) -> dict:
  """Peak device memory of a few steps of `args.method`, alone in this process."""
  import jax

  cycle, state, batch = build_step(args, args.method)
  for step in (cycle * 3)[:3]:
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  return {"peak_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")}


def run_all(args) -> dict:
  report = time_methods(args)
  peaks = {method: None for method in args.methods}
  if report.pop("memory_reported"):
    for method in args.methods:
      sizes = ["--model", args.model, "--batch", str(args.batch), "--dtype", args.dtype]
      sizes += ["--image_size", str(args.image_size), "--num_classes", str(args.num_classes)]
      peaks[method], stderr = timing.child_peak_bytes(__file__, ["--method", method, *sizes])
      if peaks[method] is None:
        raise SystemExit(f"{method} failed:\n{stderr[-3000:]}")
  return {
    "backend": report["backend"],
    "device": report["device"],
    "model": args.model,
    "batch": args.batch,
    "dtype": args.dtype,
    "params": report["params"],
    "results": report["results"],
    "peak_bytes": peaks,
  }


def table(report: dict) -> str:
  results, peaks = report["results"], report["peak_bytes"]
  lines = [
    f"{report['model']} ({report['params']:,} parameters), batch {report['batch']}, {report['dtype']},"
    f" {report['backend']} ({report['device']})",
    "",
    "| method | s/step | x SGD | peak memory |",
    "| --- | --- | --- | --- |",
  ]
  for method, seconds in results.items():
    peak = "n/a" if peaks[method] is None else f"{peaks[method] / 2**30:.2f} GiB"
    lines.append(f"| {method} | {seconds:.4f} | {seconds / results['sgd']:.2f} | {peak} |")
  if {"aace_sam", "optax_contrib_sam"} <= set(results):
    lines += ["", f"AACE-SAM / optax.contrib.sam: {results['aace_sam'] / results['optax_contrib_sam']:.3f}"]
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  if args.method:
    print(json.dumps(peak_memory_of_one_method(args)))
    return
  report = run_all(args)
  print(json.dumps(report) if args.json else table(report))


if __name__ == "__main__":
  main()
