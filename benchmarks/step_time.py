"""Seconds per training step: SGD, SAM, AACE-SAM, and AACE-SAM built on optax.contrib.sam.

    python benchmarks/step_time.py --model wrn16_4 --batch 128 --steps 20 --json
    python benchmarks/step_time.py --model wrn28_10 --batch 256 --dtype bfloat16

All methods use the same model, batch, dtype and data; the step is the full
jitted `aace_jax.make_train_step` with buffers donated. Reported: the median
wall time of `--steps` steps after two warm-up steps (compilation excluded),
the methods timed round-robin in one process so that drifts of the machine hit
all of them alike; and, where the backend reports it (GPU/TPU, not CPU), the
peak device memory of each method measured alone in a child process.
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

METHODS = ("sgd", "sam", "aace_sam", "optax_contrib_sam")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="wrn16_4", help="a model name of train/models.py")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=20, help="timed steps per method")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="computation dtype")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--num_classes", type=int, default=100)
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # peak memory of one method, in a child
  args = parser.parse_args(argv)
  if args.batch < 1 or args.steps < 1:
    parser.error(f"--batch and --steps must be positive, got {args.batch} and {args.steps}")
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
  """The jitted, donating train step of `method` and its initial state and batch."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import aace_jax
  from train import models

  base = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  tx, perturbation_loss = {
    "sgd": (base, aace_jax.aace_cross_entropy),
    "sam": (aace_jax.sam(base, 0.05), aace_jax.cross_entropy),
    "aace_sam": (aace_jax.aace_sam(base, 0.2), aace_jax.aace_cross_entropy),
    "optax_contrib_sam": (optax_contrib_aace_sam(base, 0.2), aace_jax.aace_cross_entropy),
  }[method]
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
  step = jax.jit(
    aace_jax.make_train_step(aace_jax.linen_apply_fn(model), tx, perturbation_loss=perturbation_loss),
    donate_argnums=0,
  )
  return step, state, batch


def time_methods(args) -> dict:
  """Median seconds per step of every method, timed round-robin in this process.

  Interleaving the methods step by step makes slow drifts of the machine
  (other load, clocks) fall on all of them alike.
  """
  import jax
  import numpy as np

  runs = {method: build_step(args, method) for method in METHODS}
  states = {}
  for method, (step, state, batch) in runs.items():
    for _ in range(2):  # compile and warm up
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    states[method] = state
  times = {method: [] for method in METHODS}
  for _ in range(args.steps):
    for method, (step, _, batch) in runs.items():
      start = time.perf_counter()
      states[method], metrics = step(states[method], batch)
      jax.block_until_ready((states[method], metrics))
      times[method].append(time.perf_counter() - start)
  device = jax.devices()[0]
  return {
    "backend": jax.default_backend(),
    "device": device.device_kind,
    "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(states["sgd"].params))),
    "results": {method: statistics.median(t) for method, t in times.items()},
    "memory_reported": device.memory_stats() is not None,
  }


def peak_memory_of_one_method(args) -> dict:
  """Peak device memory of a few steps of `args.method`, alone in this process."""
  import jax

  step, state, batch = build_step(args, args.method)
  for _ in range(3):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  return {"peak_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")}


def run_all(args) -> dict:
  report = time_methods(args)
  peaks = {method: None for method in METHODS}
  if report.pop("memory_reported"):
    for method in METHODS:
      command = [
        sys.executable,
        __file__,
        "--method",
        method,
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--dtype",
        args.dtype,
        "--image_size",
        str(args.image_size),
        "--num_classes",
        str(args.num_classes),
      ]
      result = subprocess.run(command, capture_output=True, text=True)
      if result.returncode != 0:
        raise SystemExit(f"{method} failed:\n{result.stderr[-3000:]}")
      peaks[method] = json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]
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
  for method in METHODS:
    peak = "n/a" if peaks[method] is None else f"{peaks[method] / 2**30:.2f} GiB"
    lines.append(f"| {method} | {results[method]:.4f} | {results[method] / results['sgd']:.2f} | {peak} |")
  lines.append("")
  lines.append(f"AACE-SAM / optax.contrib.sam: {results['aace_sam'] / results['optax_contrib_sam']:.3f}")
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
