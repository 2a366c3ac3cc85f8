"""Every accelerator figure of benchmarks/RESULTS.md from one command, and the markdown that records it.

    pip install -U "jax[cuda12]" -e ".[train]"   # add torch for the PyTorch part: pip install torch
    python benchmarks/accelerator_report.py --out benchmarks/results/h100.json
    python benchmarks/accelerator_report.py --markdown benchmarks/results/h100.json   # rewrites RESULTS.md's GPU part
    python benchmarks/accelerator_report.py --smoke --out /tmp/smoke.json            # every part, tiny, on a CPU

Before it spends any time, a child process checks that JAX sees an
accelerator (`--smoke` takes the CPU), that the project and the trainer's
packages import, and whether torch does; it says what is missing and how to
install it. Then the parts run, each in its own processes, in this order:

- `step_time`: `benchmarks/step_time.py`, WRN-28-10, batch 256, bfloat16
  then float32: sgd, sam, aace_sam, AACE-SAM on `optax.contrib.sam`,
  AACE-SAM without the non-finite guard (`aace_sam_unguarded`) and the
  cheaper steps (`perturb_every` 2, 4, 8; `perturbation_batch_fraction`
  0.25, 0.5), timed round-robin, with each one's peak device memory;
- `mfu`: the bfloat16 AACE-SAM step's FLOPs (XLA's cost analysis) over its
  time against the device's dense peak, and a `jax.profiler` trace of it
  (saved beside the JSON) with its most expensive ops;
- `norms`: one global norm of WRN-28-10's parameters, over the leaves
  concatenated (what the library does on a lone CPU device) and leaf by leaf
  (what it does elsewhere): time and the compiled program's temporary buffer;
- `trainer`: `benchmarks/input_pipeline.py`, the trainer against its own
  step, bfloat16 AACE-SAM WRN-28-10, host-fed and with `data_on_device`;
- `first_step`: `benchmarks/first_step.py`, PyramidNet-272 (batch 64) and the
  authors' WRN-28-10 (batch 256), each cold and from the compilation cache
  (the cached process is what a resumed run pays, less the init, which a
  resume replaces with its restore);
- `vs_pytorch`: `benchmarks/vs_pytorch.py` when torch imports, else a line
  saying so;
- `seeds`: `benchmarks/run_time.py seeds`, the label-noise comparison's
  network and SAM step for 1 seed and for 2, 4 and 8 seeds vmapped in one
  program (each on the same batch, and each on its own), per seed: whether
  an accelerator runs a comparison's seeds faster together than one after
  another (on the 2-core CPU it does not).

The compilation caches start empty (a new folder per run). `--budget`
seconds bound the whole run: the sizes (timed steps, trainer epochs) shrink
with it, a part that no longer fits is skipped, and a part running past the
end is stopped; either is recorded with the reason. The JSON is rewritten
after every part, so a run cut short keeps what it measured.

`--markdown JSON` writes the figures of a report into `--results` (default
`benchmarks/RESULTS.md`) between the lines `<!-- accelerator-report:begin -->`
and `<!-- accelerator-report:end -->`, replacing what was there: recording a
GPU run is this command and one commit. `--smoke` checks that the report and
its markdown hold every part (CI runs it).
"""

import argparse
import collections
import contextlib
import functools
import glob
import gzip
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import step_time  # noqa: E402 (a sibling script, importable once its folder is on the path)

PARTS = ("step_time", "mfu", "norms", "trainer", "first_step", "vs_pytorch", "seeds")
BEGIN, END = "<!-- accelerator-report:begin -->", "<!-- accelerator-report:end -->"
INSTALL = 'pip install -U "jax[cuda12]" -e ".[train]"  (and, for the PyTorch part, pip install torch)'
STEP_METHODS = step_time.METHODS
FULL_BUDGET = 480.0  # seconds: the sizes below are for this budget

# The sizes of every part: the paper's models on an accelerator, the smallest that run the same code on a CPU.
SIZES = {
  "full": {
    "model": "wrn28_10",
    "batch": 256,
    "image_size": 32,
    "num_classes": 100,
    "steps": 16,
    "num_train": 256 * 40,
    "epochs": 3,
    "first_step": [("pyramidnet272", 64), ("wrn28_10_authors", 256)],
    "seeds": "2,4,8",
    "seeds_config": "train/configs/label_noise.py:0.4",
  },
  "smoke": {
    "model": "small_cnn",
    "batch": 8,
    "image_size": 8,
    "num_classes": 10,
    "steps": 8,
    "num_train": 8 * 8,
    "epochs": 2,
    "first_step": [("small_cnn", 8)],
    "seeds": "2",
    "seeds_config": "train/configs/default.py",
  },
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", help="the report's JSON file (its folder also gets the profile)")
  parser.add_argument("--budget", type=float, default=FULL_BUDGET, help="seconds for the whole run")
  parser.add_argument("--smoke", action="store_true", help="every part at the smallest sizes, on any device")
  parser.add_argument("--markdown", metavar="JSON", help="write this report's figures into --results")
  parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="the markdown file --markdown rewrites")
  parser.add_argument("--part", choices=("preflight", "mfu", "norms"), help=argparse.SUPPRESS)  # in a child
  args = parser.parse_args(argv)
  if not args.part and not args.markdown and not args.out:
    parser.error("give --out REPORT.json to measure, or --markdown REPORT.json to record a report")
  if args.budget <= 0:
    parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
  return args


# ---------------------------------------------------------------------------
# Parts that run in a child process of this script.
# ---------------------------------------------------------------------------


def preflight() -> dict:
  """What the parts need, checked before they run: the device, the project, the trainer's packages, torch."""
  import importlib.metadata

  report = {"missing": []}
  for module in ("jax", "optax", "flax", "ml_collections", "orbax.checkpoint", "aace_jax", "train.train"):
    try:
      __import__(module)
    except Exception as error:  # noqa: BLE001 (any failure to import is what is reported)
      report["missing"].append(f"{module} ({type(error).__name__}: {error})")
  try:
    import torch  # noqa: F401 (whether it imports is the question)

    report["torch"] = importlib.metadata.version("torch")
  except ImportError:
    report["torch"] = None
  if "jax" not in " ".join(report["missing"]):
    import jax

    device = jax.devices()[0]
    report.update(
      backend=jax.default_backend(),
      device=device.device_kind,
      device_count=jax.device_count(),
      memory_reported=device.memory_stats() is not None,
    )
  report["versions"] = {}
  for package in ("jax", "jaxlib", "optax", "flax", "numpy", "jax-cuda12-plugin"):
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      report["versions"][package] = importlib.metadata.version(package)
  report["versions"]["python"] = platform.python_version()
  report["host"] = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
  return report


def build_aace_sam_step(sizes: dict, dtype: str):
  """The bfloat16 AACE-SAM train step of step_time.py, jitted, with its state and batch."""
  args = argparse.Namespace(
    model=sizes["model"],
    batch=sizes["batch"],
    dtype=dtype,
    image_size=sizes["image_size"],
    num_classes=sizes["num_classes"],
  )
  (step,), state, batch = step_time.build_step(args, "aace_sam")
  return step, state, batch


def median_seconds(fn, repeats: int) -> float:
  import jax

  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def mfu(sizes: dict, profile_dir: str) -> dict:
  """FLOPs per step, seconds per step and model FLOPs utilization of the bfloat16 AACE-SAM step; its top ops."""
  import jax
  import vs_pytorch

  step, state, batch = build_aace_sam_step(sizes, "bfloat16")
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
  for _ in range(3):
    state, metrics = step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(sizes["steps"]):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
    for _ in range(3):
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
  device = jax.devices()[0].device_kind
  peak = vs_pytorch.PEAK_TFLOPS.get(device, {}).get("bfloat16")
  return {
    "flops_per_step": flops,
    "seconds_per_step": seconds,
    "tflops_per_second": flops / seconds / 1e12,
    "peak_tflops": peak,
    "mfu": flops / seconds / (peak * 1e12) if peak else None,
    "top_ops": top_ops(profile_dir),
    "profile_dir": profile_dir,
  }


def top_ops(profile_dir: str, count: int = 3) -> list:
  """The `count` ops with the most time in a profile: on an accelerator its device lanes, on a CPU XLA's threads."""
  [path] = glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"), recursive=True)[-1:]
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {
    (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
  }
  devices = {pid for pid, name in processes.items() if name.startswith("/device:")}

  def is_op(event) -> bool:
    # Python frames ($), ends of async ops and the runtime's own C++ frames (::) are not ops.
    if event.get("ph") != "X" or event["name"].startswith(("$", "end:")) or "::" in event["name"]:
      return False
    if devices:
      return event["pid"] in devices
    return "XLA" in threads.get((event["pid"], event["tid"]), "")

  totals = collections.Counter()
  for event in events:
    if is_op(event):
      totals[event["name"]] += event.get("dur", 0.0)
  whole = sum(totals.values()) or 1.0
  return [{"op": name, "share": round(micros / whole, 4)} for name, micros in totals.most_common(count)]


def norms(sizes: dict) -> dict:
  """One global norm of the model's parameters, concatenated against leaf by leaf: seconds and temporary bytes."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from aace_jax import _norms
  from train import models

  model = models.create_model(sizes["model"], sizes["num_classes"])
  image = jnp.zeros((1, sizes["image_size"], sizes["image_size"], 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False)["params"])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
  result = {"leaves": len(jax.tree.leaves(params))}
  forms = {
    "concatenated": functools.partial(_norms.global_norm, concatenate=True),
    "per_leaf": functools.partial(_norms.global_norm, concatenate=False),
  }
  for name, fn in forms.items():
    jitted = jax.jit(fn)
    memory = jitted.lower(params).compile().memory_analysis()
    result[name] = {
      "seconds": median_seconds(lambda jitted=jitted: jitted(params), 20),
      "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
    }
  result["param_bytes"] = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
  return result


# ---------------------------------------------------------------------------
# The run: parts in child processes, the JSON after each.
# ---------------------------------------------------------------------------


class Run:
  """The report being written: parts run in children under one deadline; the JSON is rewritten after each."""

  def __init__(self, args, sizes: dict, cache_root: str):
    self.args, self.sizes, self.out = args, sizes, pathlib.Path(args.out)
    self.deadline = time.monotonic() + args.budget
    self.env = dict(
      os.environ,
      # Cold caches: the trainer's (under XDG_CACHE_HOME) and jax's own for the benchmark scripts,
      # which lets a script's child processes (peak memory) reuse what its parent compiled.
      XDG_CACHE_HOME=os.path.join(cache_root, "xdg"),
      JAX_COMPILATION_CACHE_DIR=os.path.join(cache_root, "jax"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    )
    self.report = {"smoke": args.smoke, "budget_seconds": args.budget, "sizes": sizes, "parts": {}}

  def left(self) -> float:
    return self.deadline - time.monotonic()

  def save(self) -> None:
    self.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = self.out.with_name(self.out.name + ".tmp")
    temporary.write_text(json.dumps(self.report, indent=1) + "\n")
    os.replace(temporary, self.out)  # a kill leaves the previous complete report, never half of one

  def child(self, command: list, needs: float) -> dict:
    """The last JSON line a child prints, or why there is none (skipped, stopped at the deadline, failed)."""
    if self.left() < needs:
      return {
        "status": "skipped",
        "reason": f"{self.left():.0f} s of the budget left, the part needs about {needs:.0f}",
      }
    start = time.monotonic()
    try:
      result = subprocess.run(
        [sys.executable, *command], capture_output=True, text=True, env=self.env, timeout=max(self.left(), 1)
      )
    except subprocess.TimeoutExpired:
      return {
        "status": "stopped",
        "reason": f"stopped at the end of the budget, after {time.monotonic() - start:.0f} s",
      }
    if result.returncode != 0:
      return {"status": "failed", "reason": result.stderr.strip().splitlines()[-1:] or ["no output"]}
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return {"status": "ok", "seconds": round(time.monotonic() - start, 1), **figures}

  def part(self, name: str, value: dict) -> None:
    self.report["parts"][name] = value
    self.save()
    print(f"{name}: {json.dumps(value)[:2000]}", flush=True)


def scaled(count: int, budget: float, smoke: bool) -> int:
  """`count` shrunk with the budget (sizes are for FULL_BUDGET seconds), at least 2; smoke sizes are kept."""
  return count if smoke else max(2, round(count * min(1.0, budget / FULL_BUDGET)))


def measure(args) -> dict:
  sizes = dict(SIZES["smoke" if args.smoke else "full"])
  sizes["steps"] = max(8, scaled(sizes["steps"], args.budget, args.smoke))  # k = 8 needs a whole cycle
  sizes["epochs"] = scaled(sizes["epochs"], args.budget, args.smoke)
  with tempfile.TemporaryDirectory(prefix="accelerator_report_") as cache_root:
    run = Run(args, sizes, cache_root)
    checked = run.child([__file__, "--part", "preflight", *(["--smoke"] if args.smoke else [])], needs=0)
    if checked["status"] != "ok" or checked["missing"]:
      raise SystemExit(f"cannot run: {checked.get('missing') or checked.get('reason')}; install with: {INSTALL}")
    if not args.smoke and checked["backend"] == "cpu":
      raise SystemExit(f"JAX sees no accelerator (backend cpu); install with: {INSTALL}; or run --smoke")
    run.report["machine"] = {k: checked[k] for k in ("backend", "device", "device_count", "versions", "host")}
    run.report["machine"]["torch"] = checked["torch"]
    run.save()
    print(f"machine: {json.dumps(run.report['machine'])}", flush=True)
    common = ["--model", sizes["model"], "--batch", str(sizes["batch"]), "--image_size", str(sizes["image_size"])]
    common += ["--num_classes", str(sizes["num_classes"])]
    step_time = {}
    for dtype in ("bfloat16", "float32"):
      # The smoke run's float32 pass times the reference methods only: the same code, a third of the compiles.
      methods = STEP_METHODS[:3] if args.smoke and dtype == "float32" else STEP_METHODS
      step_time[dtype] = run.child(
        [str(HERE / "step_time.py"), *common, "--steps", str(sizes["steps"]), "--dtype", dtype, "--json"]
        + ["--methods", ",".join(methods)],
        needs=60,
      )
      run.part("step_time", dict(step_time))
    smoke = ["--smoke"] if args.smoke else []
    run.part("mfu", run.child([__file__, "--part", "mfu", "--out", str(run.out), *smoke], needs=30))
    run.part("norms", run.child([__file__, "--part", "norms", "--out", str(run.out), *smoke], needs=15))
    trainer = {}
    for mode in ("host_fed", "data_on_device"):
      command = [str(HERE / "input_pipeline.py"), "--model", sizes["model"], "--method", "aace_sam"]
      command += ["--dtype", "bfloat16", "--batch", str(sizes["batch"]), "--num_train", str(sizes["num_train"])]
      command += ["--epochs", str(sizes["epochs"]), "--json"] + (
        ["--data_on_device"] if mode == "data_on_device" else []
      )
      trainer[mode] = run.child(command, needs=45)
      run.part("trainer", dict(trainer))
    first_step = {}
    for model, batch in sizes["first_step"]:
      command = [str(HERE / "first_step.py"), "--model", model, "--batch", str(batch), "--method", "aace_sam"]
      first_step[model] = run.child([*command, "--json"], needs=60)
      run.part("first_step", dict(first_step))
    if checked["torch"]:
      torch_model = "wrn16_4" if args.smoke else sizes["model"]
      command = [str(HERE / "vs_pytorch.py"), "--model", torch_model, "--batch", str(sizes["batch"])]
      run.part("vs_pytorch", run.child([*command, "--steps", str(min(sizes["steps"], 10)), "--json"], needs=90))
    else:
      run.part("vs_pytorch", {"status": "skipped", "reason": "torch is not importable here (pip install torch)"})
    command = [str(HERE / "run_time.py"), "seeds", "--config", str(HERE.parent / sizes["seeds_config"])]
    command += ["--method", "sam", "--seeds", sizes["seeds"], "--rounds", str(sizes["steps"]), "--json"]
    run.part("seeds", run.child(command, needs=60))
    run.report["finished"] = True
    run.save()
    return run.report


# ---------------------------------------------------------------------------
# The markdown.
# ---------------------------------------------------------------------------


def gib(value) -> str:
  """Bytes in GiB, or MiB / KiB where that would read 0.00."""
  if value is None:
    return "n/a"
  for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
    if abs(value) >= size / 100:
      return f"{value / size:.2f} {unit}"
  return f"{value / 2**10:.1f} KiB"


def not_measured(part: dict) -> str:
  reason = part.get("reason", "not in this report")
  return f"Not measured: {reason if isinstance(reason, str) else ' '.join(reason)}."


def step_time_markdown(parts: dict) -> list:
  lines = ["### Step time and peak memory", ""]
  for dtype, part in parts.get("step_time", {}).items():
    if part.get("status") != "ok":
      lines += [f"{dtype}: {not_measured(part)}", ""]
      continue
    results, peaks = part["results"], part["peak_bytes"]
    lines += [
      f"{part['model']} ({part['params']:,} parameters), batch {part['batch']}, {dtype}:",
      "",
      "| method | s/step | x SGD | peak memory |",
      "| --- | --- | --- | --- |",
    ]
    for method, seconds in results.items():
      lines.append(f"| {method} | {seconds:.4f} | {seconds / results['sgd']:.2f} | {gib(peaks.get(method))} |")
    lines.append("")
    if peaks.get("aace_sam") is not None and peaks.get("sgd") is not None:
      extra, one_copy = peaks["aace_sam"] - peaks["sgd"], 4 * part["params"]
      verdict = "within" if extra <= one_copy else "above"
      lines += [
        f"AACE-SAM's peak memory is SGD's plus {gib(extra)}, {verdict} one float32 copy of the parameters"
        f" ({gib(one_copy)}).",
        "",
      ]
    if "aace_sam_unguarded" in results:
      guard = results["aace_sam"] / results["aace_sam_unguarded"]
      lines += [f"The non-finite guard: AACE-SAM with it / without it = {guard:.3f}.", ""]
  return lines


def mfu_markdown(part: dict) -> list:
  lines = ["### Utilization of the bfloat16 AACE-SAM step", ""]
  if part.get("status") != "ok":
    return lines + [not_measured(part), ""]
  mfu = "n/a (no peak rate known for this device)" if part["mfu"] is None else f"{100 * part['mfu']:.1f}%"
  lines += [
    f"{part['flops_per_step'] / 1e12:.3g} TFLOP per step (XLA's cost analysis), {part['seconds_per_step']:.4g} s per"
    f" step: {part['tflops_per_second']:.3g} TFLOP/s, MFU {mfu} against {part['peak_tflops'] or 'n/a'} TFLOP/s.",
    "The most expensive ops of a `jax.profiler` trace of three steps (share of the traced op time):",
    "",
  ]
  lines += [f"{i}. `{op['op']}`: {100 * op['share']:.1f}%" for i, op in enumerate(part["top_ops"], 1)]
  return lines + [""]


def norms_markdown(part: dict) -> list:
  lines = ["### A global norm: concatenated leaves against leaf by leaf", ""]
  if part.get("status") != "ok":
    return lines + [not_measured(part), ""]
  lines += [
    f"{part['leaves']} parameter leaves, {gib(part['param_bytes'])}:",
    "",
    "| form | s | temporary buffer |",
    "| --- | --- | --- |",
  ]
  for form in ("concatenated", "per_leaf"):
    lines.append(f"| {form} | {part[form]['seconds']:.6f} | {gib(part[form]['temp_bytes'])} |")
  return lines + [""]


def trainer_markdown(parts: dict) -> list:
  lines = ["### The trainer against its step (bfloat16 AACE-SAM)", ""]
  rows = [
    "| mode | trainer img/s | step img/s | trainer / step | host ms per step |",
    "| --- | --- | --- | --- | --- |",
  ]
  for mode, part in parts.get("trainer", {}).items():
    if part.get("status") != "ok":
      lines += [f"{mode}: {not_measured(part)}", ""]
      continue
    rows.append(
      f"| {mode} | {part['trainer_images_per_sec']:,} | {part['step_images_per_sec']:,} |"
      f" {part['trainer_over_step']:.3f} | {part['host_ms_per_step']:.2f} |"
    )
  return lines + (rows + [""] if len(rows) > 2 else [])


def first_step_markdown(parts: dict) -> list:
  lines = ["### Time to the first step (AACE-SAM), cold and from the compilation cache", ""]
  rows = ["| model, batch | phase | cold (s) | cached (s) |", "| --- | --- | --- | --- |"]
  for model, part in parts.get("first_step", {}).items():
    if part.get("status") != "ok":
      lines += [f"{model}: {not_measured(part)}", ""]
      continue
    for phase in ("compile_seconds", "init_seconds", "ready_seconds", "step_seconds", "first_step_seconds"):
      rows.append(f"| {model}, {part['batch']} | {phase} | {part['cold'][phase]} | {part['cached'][phase]} |")
  if len(rows) > 2:
    rows += ["", "A resumed run pays the cached column less `init_seconds`: it restores the checkpoint instead.", ""]
  return lines + (rows if len(rows) > 2 else [])


def vs_pytorch_markdown(part: dict) -> list:
  lines = ["### Against PyTorch, side by side", ""]
  if part.get("status") != "ok":
    return lines + [not_measured(part), ""]
  lines += ["| implementation | method | s/step | peak memory | MFU |", "| --- | --- | --- | --- | --- |"]
  for name, result in part["results"].items():
    implementation, method = name.split(":")
    mfu = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    lines.append(
      f"| {implementation} | {method} | {result['seconds_per_step']:.4f} | {gib(result['peak_bytes'])} | {mfu} |"
    )
  lines += [""] + [f"- {name}: {ratio:.3f}" for name, ratio in part["ratios"].items()]
  return lines + [""]


def seeds_markdown(part: dict) -> list:
  lines = ["### Seeds in one program (`jax.vmap`), SAM", ""]
  if part.get("status") != "ok":
    return lines + [not_measured(part), ""]
  config = os.path.relpath(part["config"], HERE.parent) if os.path.isabs(part["config"]) else part["config"]
  lines += [f"The network and batch of `{config}`.", ""]
  one = part["seconds_per_seed_step"]["one seed"]
  lines += ["| variant | s/step | s/step per seed | per seed x one seed |", "| --- | --- | --- | --- |"]
  for name, seconds in part["seconds_per_step"].items():
    per_seed = part["seconds_per_seed_step"][name]
    lines.append(f"| {name} | {seconds:.5f} | {per_seed:.5f} | {per_seed / one:.2f} |")
  return lines + [""]


def markdown(report: dict) -> str:
  """The report as the accelerator sections of RESULTS.md."""
  machine, parts = report["machine"], report["parts"]
  versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
  lines = [
    f"## {machine['device']} ({machine['backend']}, {machine['device_count']} device(s)): the accelerator report",
    "",
    f"Command: `python benchmarks/accelerator_report.py{' --smoke' if report['smoke'] else ''}"
    f" --budget {report['budget_seconds']:.0f} --out ...` ({report['sizes']['steps']} timed steps a method;"
    f" caches cold at the start), {versions}; host {machine['host']['cpu']}, {machine['host']['cpu_count']} cores;"
    f" torch {machine['torch'] or 'not installed'}.",
    "",
  ]
  if not report.get("finished"):
    lines += ["The run did not finish: the parts below are those it completed.", ""]
  lines += step_time_markdown(parts)
  lines += mfu_markdown(parts.get("mfu", {}))
  lines += norms_markdown(parts.get("norms", {}))
  lines += trainer_markdown(parts)
  lines += first_step_markdown(parts)
  lines += vs_pytorch_markdown(parts.get("vs_pytorch", {}))
  lines += seeds_markdown(parts.get("seeds", {}))
  return "\n".join(lines).rstrip() + "\n"


def write_markdown(report: dict, results: pathlib.Path) -> None:
  text = results.read_text()
  if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
    raise SystemExit(f"{results} must hold one {BEGIN} line and one {END} line after it")
  head, rest = text.split(BEGIN)
  _, tail = rest.split(END)
  temporary = results.with_name(results.name + ".tmp")
  temporary.write_text(f"{head}{BEGIN}\n{markdown(report)}{END}{tail}")
  os.replace(temporary, results)


def check_complete(report: dict, text: str) -> None:
  """Raises unless every part ran and the markdown shows each (the smoke run's check)."""
  parts = report["parts"]
  missing = [name for name in PARTS if name not in parts]
  nested = {"step_time": ("bfloat16", "float32"), "trainer": ("host_fed", "data_on_device")}
  failed = [
    f"{name}:{key}"
    for name, keys in nested.items()
    for key in keys
    if parts.get(name, {}).get(key, {}).get("status") != "ok"
  ]
  failed += [name for name in ("mfu", "norms", "seeds") if parts.get(name, {}).get("status") != "ok"]
  failed += [f"first_step:{model}" for model, part in parts.get("first_step", {}).items() if part["status"] != "ok"]
  if parts.get("vs_pytorch", {}).get("status") not in ("ok", "skipped"):
    failed.append("vs_pytorch")
  headings = ("### Step time", "### Utilization", "### A global norm", "### The trainer", "### Time to the first")
  headings += ("### Seeds in one program",)
  unshown = [heading for heading in headings if heading not in text]
  if missing or failed or unshown:
    raise SystemExit(f"incomplete report: parts missing {missing}, failed {failed}, not in the markdown {unshown}")


def main(argv=None):
  args = parse_args(argv)
  if args.part:
    sizes = SIZES["smoke" if args.smoke else "full"]
    if args.part == "preflight":
      print(json.dumps(preflight()))
    elif args.part == "mfu":
      profile_dir = str(pathlib.Path(args.out).with_suffix("")) + "_profile"
      print(json.dumps(mfu({**sizes, "steps": 5 if args.smoke else 20}, profile_dir)))
    else:
      print(json.dumps(norms(sizes)))
    return
  if args.markdown:
    report = json.loads(pathlib.Path(args.markdown).read_text())
    write_markdown(report, pathlib.Path(args.results))
    print(f"wrote the accelerator sections of {args.results}")
    return
  report = measure(args)
  if args.smoke:
    check_complete(report, markdown(report))
    print("smoke: every part ran and its markdown is complete")


if __name__ == "__main__":
  main()
