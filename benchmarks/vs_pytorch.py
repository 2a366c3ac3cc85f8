"""The same WideResNet step in PyTorch and in aace-jax, timed side by side in one process.

    python benchmarks/vs_pytorch.py --model wrn28_10 --batch 256 --json     # a GPU
    python benchmarks/vs_pytorch.py --model wrn16_4 --batch 32 --steps 3    # a quick check on a CPU

Implementations (each for SGD, SAM and AACE-SAM):
- `torch_fp32`: PyTorch eager, float32, NCHW, foreach SGD;
- `torch_bf16`: PyTorch eager under bfloat16 autocast, channels_last;
- `torch_compile`: `torch_bf16` with the model under `torch.compile` (left
  out, with the reason, where it fails on the machine);
- `jax_fp32`, `jax_bf16`: `aace_jax.make_train_step` (jitted, state donated)
  with float32 parameters computing in float32 or bfloat16.

The PyTorch step restates the authors' published algorithm (T-Ratchatorn/AACE,
their SAM class and AACE loss): first pass and backward, the perturbation
(SAM: `rho g / (||g|| + 1e-12)` ascending; AACE-SAM: `-rho g`, not
normalized), second pass without updating the BatchNorm running statistics,
then SGD(lr 0.1, momentum 0.9, weight decay 5e-4) at the unperturbed weights.
`tests/test_vs_pytorch.py` checks in float64 that it gives our update.

Every configuration takes one step in turn (round-robin) after two warm-up
steps, so drifts of the machine fall on all alike; reported is the median.
Peak device memory, where the backend reports it, comes from a child process
per configuration. MFU is XLA's cost analysis of our step (its FLOPs, the
same algorithm for both frameworks) over the time, against the device's
dense peak in `PEAK_TFLOPS`. Without torch the PyTorch side is skipped, and
said so.
"""

import argparse
import json
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import timing  # noqa: E402 (a sibling module, importable once its folder is on the path)

METHODS = ("sgd", "sam", "aace_sam")
TORCH_IMPLEMENTATIONS = ("torch_fp32", "torch_bf16", "torch_compile")
JAX_IMPLEMENTATIONS = ("jax_fp32", "jax_bf16")
RHO = {"sgd": 0.0, "sam": 0.05, "aace_sam": 0.2}

# Dense (no sparsity) tensor-core peaks in TFLOP/s, by `device_kind`, from
# NVIDIA's datasheets (H100 SXM5 and H200 SXM: 989.4 bf16, 494.7 tf32; H100
# PCIe: 756.5 / 378; A100 SXM and PCIe: 312 / 156) and Google's TPU pages
# (v4: 275, v5e: 197, v5p: 459 bf16). float32 is compared with the tf32 peak:
# XLA runs float32 convolutions on tensor cores in tf32 by default on GPUs.
PEAK_TFLOPS = {
  "NVIDIA H100 80GB HBM3": {"bfloat16": 989.4, "float32": 494.7},
  "NVIDIA H100 PCIe": {"bfloat16": 756.5, "float32": 378.0},
  "NVIDIA H200": {"bfloat16": 989.4, "float32": 494.7},
  "NVIDIA A100-SXM4-80GB": {"bfloat16": 312.0, "float32": 156.0},
  "NVIDIA A100-SXM4-40GB": {"bfloat16": 312.0, "float32": 156.0},
  "NVIDIA A100-PCIE-40GB": {"bfloat16": 312.0, "float32": 156.0},
  "TPU v4": {"bfloat16": 275.0},
  "TPU v5 lite": {"bfloat16": 197.0},
  "TPU v5": {"bfloat16": 459.0},
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(
    "--model", default="wrn16_4", help="wrn<depth>_<width> for both sides; any train/models.py name without torch"
  )
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--num_classes", type=int, default=100)
  parser.add_argument("--json", action="store_true", help="print only the JSON line")
  parser.add_argument("--only", help=argparse.SUPPRESS)  # "implementation:method", peak memory in a child
  args = parser.parse_args(argv)
  if args.batch < 1 or args.steps < 1:
    parser.error(f"--batch and --steps must be positive, got {args.batch} and {args.steps}")
  return args


def wrn_depth_width(model: str) -> tuple[int, int]:
  """`wrn28_10` -> (28, 10); the standard WRN of train/models.py that the torch side restates."""
  try:
    depth, width = model.removeprefix("wrn").split("_")
    return int(depth), int(width)
  except ValueError:
    raise SystemExit(f"--model {model!r}: the PyTorch side builds WideResNets only, wrn<depth>_<width>.") from None


# ---------------------------------------------------------------------------
# The PyTorch side.
# ---------------------------------------------------------------------------


def torch_wide_resnet(depth: int, width: int, num_classes: int):
  """The pre-activation WideResNet of train/models.py (standard, (depth - 4) / 6 units a group) in torch."""
  import torch
  from torch import nn

  class Unit(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.norm1, self.norm2 = nn.BatchNorm2d(cin, momentum=0.1), nn.BatchNorm2d(cout, momentum=0.1)
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
      activated = torch.relu(self.norm1(x))
      shortcut = x if self.shortcut is None else self.shortcut(activated)
      y = self.conv2(torch.relu(self.norm2(self.conv1(activated))))
      return y + shortcut

  units = (depth - 4) // 6
  layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)], 16
  for group, stride in enumerate((1, 2, 2)):
    for unit in range(units):
      cout = 16 * width * 2**group
      layers.append(Unit(cin, cout, stride if unit == 0 else 1))
      cin = cout
  layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
  return nn.Sequential(*layers)


def _at_least_float32(logits):
  import torch

  return logits.to(torch.promote_types(logits.dtype, torch.float32))


def torch_cross_entropy(logits, labels):
  import torch

  return torch.nn.functional.cross_entropy(_at_least_float32(logits), labels)


def torch_aace_cross_entropy(logits, labels):
  """The authors' AACE loss at threshold 0, mode "ada": cross-entropy against the softmax of the other classes."""
  import torch

  logits = _at_least_float32(logits)
  true_class = torch.nn.functional.one_hot(labels, logits.shape[-1]).bool()
  targets = torch.softmax(logits.detach().masked_fill(true_class, float("-inf")), -1)
  return -(targets * torch.log_softmax(logits, -1)).sum(-1).mean()


def torch_step(model, optimizer, images, labels, method: str, rho: float, *, autocast_dtype=None):
  """One step of SGD, SAM or AACE-SAM as the authors' training loop takes it."""
  import torch

  def forward_loss(loss_fn):
    with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
      logits = model(images)
    return loss_fn(logits, labels)

  params = [p for p in model.parameters() if p.requires_grad]
  if method == "sgd":
    forward_loss(torch_cross_entropy).backward()
  else:
    forward_loss(torch_aace_cross_entropy if method == "aace_sam" else torch_cross_entropy).backward()
    with torch.no_grad():
      grads = [p.grad for p in params]
      if method == "sam":
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        perturbation = torch._foreach_mul(grads, rho / (norm + 1e-12))  # pylint: disable=protected-access
      else:
        perturbation = torch._foreach_mul(grads, -rho)  # pylint: disable=protected-access
      torch._foreach_add_(params, perturbation)  # pylint: disable=protected-access
    optimizer.zero_grad(set_to_none=True)
    # The authors' (davda54's) disable_running_stats: BatchNorm momentum 0 in
    # the second pass keeps the running statistics of the first.
    momenta = [(m, m.momentum) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]  # pylint: disable=protected-access
    for module, _ in momenta:
      module.momentum = 0.0
    forward_loss(torch_cross_entropy).backward()
    for module, momentum in momenta:
      module.momentum = momentum
    with torch.no_grad():
      torch._foreach_sub_(params, perturbation)  # pylint: disable=protected-access
  optimizer.step()
  optimizer.zero_grad(set_to_none=True)


def torch_optimizer(model):
  import torch

  return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True)


def build_torch(args, implementation: str, method: str):
  """A zero-argument function taking one step, and the function that waits for the device."""
  import torch

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  depth, width = wrn_depth_width(args.model)
  model = torch_wide_resnet(depth, width, args.num_classes).to(device)
  generator = torch.Generator().manual_seed(0)
  images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator).to(device)
  labels = torch.randint(0, args.num_classes, (args.batch,), generator=generator).to(device)
  autocast_dtype = None
  if implementation in ("torch_bf16", "torch_compile"):
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    autocast_dtype = torch.bfloat16
  optimizer = torch_optimizer(model)
  runnable = torch.compile(model) if implementation == "torch_compile" else model
  synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  return lambda: torch_step(
    runnable, optimizer, images, labels, method, RHO[method], autocast_dtype=autocast_dtype
  ), synchronize


# ---------------------------------------------------------------------------
# The JAX side.
# ---------------------------------------------------------------------------


def build_jax(args, implementation: str, method: str):
  import jax
  import step_time

  step_args = argparse.Namespace(
    model=args.model,
    batch=args.batch,
    image_size=args.image_size,
    num_classes=args.num_classes,
    dtype="bfloat16" if implementation == "jax_bf16" else "float32",
  )
  (step,), state, batch = step_time.build_step(step_args, method)  # sgd, sam, aace_sam: one step a cycle
  # One compile serves both the cost analysis and the timed steps (the jitted
  # step would compile again on its first call).
  compiled = step.lower(state, batch).compile()
  flops = (compiled.cost_analysis() or {}).get("flops")
  holder = {"state": state}

  def one_step():
    holder["state"], holder["metrics"] = compiled(holder["state"], batch)

  return one_step, lambda: jax.block_until_ready((holder["state"], holder.get("metrics"))), flops


# ---------------------------------------------------------------------------
# Timing and the report.
# ---------------------------------------------------------------------------


def torch_available() -> tuple[bool, str]:
  try:
    import torch  # noqa: F401 (whether it imports is the question)
  except ImportError as error:
    return False, f"torch is not installed ({error}); the PyTorch side is skipped (pip install -e '.[bench]')"
  return True, ""


def build_all(args) -> tuple[dict, dict, dict]:
  runs, flops, failures = {}, {}, {}
  has_torch, _ = torch_available()
  for implementation in (TORCH_IMPLEMENTATIONS if has_torch else ()) + JAX_IMPLEMENTATIONS:
    for method in METHODS:
      name = f"{implementation}:{method}"
      try:
        if implementation.startswith("torch"):
          runs[name] = build_torch(args, implementation, method)
        else:
          one_step, wait, flops[name] = build_jax(args, implementation, method)
          runs[name] = (one_step, wait)
        for _ in range(2):  # compile and warm up
          runs[name][0]()
        runs[name][1]()
      except Exception as error:  # pylint: disable=broad-except
        if implementation != "torch_compile":
          raise
        # torch.compile needs a working compiler toolchain; its absence is a result, not a crash.
        runs.pop(name, None)
        failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
  return runs, flops, failures


def peak_memory(args, name: str) -> dict:
  """Peak device memory of a few steps of one configuration, alone in this process (bytes, or None)."""
  implementation, method = name.split(":")
  if implementation.startswith("torch"):
    import torch

    one_step, wait = build_torch(args, implementation, method)
    for _ in range(3):
      one_step()
    wait()
    return {"peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}
  import jax

  one_step, wait, _ = build_jax(args, implementation, method)
  for _ in range(3):
    one_step()
  wait()
  return {"peak_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")}


def run(args) -> dict:
  import jax

  has_torch, torch_note = torch_available()
  runs, flops, failures = build_all(args)
  waited = {name: (lambda _, run=run: (run[0](), run[1]())) for name, run in runs.items()}
  seconds = {name: statistics.median(t) for name, t in timing.round_robin(waited, args.steps).items()}
  device = jax.devices()[0]
  peaks = {name: None for name in runs}
  if device.memory_stats() is not None:
    for name in runs:
      sizes = ["--model", args.model, "--batch", str(args.batch)]
      sizes += ["--image_size", str(args.image_size), "--num_classes", str(args.num_classes)]
      peaks[name], _ = timing.child_peak_bytes(__file__, ["--only", name, *sizes])
  peak_table = PEAK_TFLOPS.get(device.device_kind, {})
  results = {}
  for name, s in seconds.items():
    implementation, method = name.split(":")
    dtype = "float32" if implementation.endswith("fp32") else "bfloat16"
    step_flops = flops.get(f"jax_{'fp32' if dtype == 'float32' else 'bf16'}:{method}")
    peak = peak_table.get(dtype)
    results[name] = {
      "seconds_per_step": s,
      "images_per_second": args.batch / s,
      "peak_bytes": peaks[name],
      "mfu": step_flops / s / (peak * 1e12) if step_flops and peak else None,
    }
  ratios = {}
  for method in METHODS:
    ours = results.get(f"jax_bf16:{method}", {}).get("seconds_per_step")
    for theirs in ("torch_fp32", "torch_bf16", "torch_compile"):
      other = results.get(f"{theirs}:{method}", {}).get("seconds_per_step")
      if ours and other:
        ratios[f"jax_bf16/{theirs}:{method}"] = ours / other
    ours32, theirs32 = (results.get(f"{i}:{method}", {}).get("seconds_per_step") for i in ("jax_fp32", "torch_fp32"))
    if ours32 and theirs32:
      ratios[f"jax_fp32/torch_fp32:{method}"] = ours32 / theirs32
  return {
    "model": args.model,
    "batch": args.batch,
    "image_size": args.image_size,
    "num_classes": args.num_classes,
    "backend": jax.default_backend(),
    "device": device.device_kind,
    "peak_tflops": peak_table or None,
    "torch": has_torch,
    "torch_note": torch_note or None,
    "failures": failures,
    "results": results,
    "ratios": ratios,
  }


def table(report: dict) -> str:
  lines = [
    f"{report['model']}, batch {report['batch']}, {report['num_classes']} classes,"
    f" {report['backend']} ({report['device']})",
    "",
    "| implementation | method | s/step | img/s | peak memory | MFU |",
    "| --- | --- | --- | --- | --- | --- |",
  ]
  for name, r in report["results"].items():
    implementation, method = name.split(":")
    peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f} GiB"
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    lines.append(
      f"| {implementation} | {method} | {r['seconds_per_step']:.4f} | {r['images_per_second']:.0f} | {peak} | {mfu} |"
    )
  lines.append("")
  lines += [f"{k}: {v:.3f}" for k, v in report["ratios"].items()]
  if report["torch_note"]:
    lines.append(report["torch_note"])
  lines += [f"{k} left out: {v}" for k, v in report["failures"].items()]
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  if torch_available()[0] and not args.only:
    wrn_depth_width(args.model)  # fail before any compile
  if args.only:
    print(json.dumps(peak_memory(args, args.only)))
    return
  report = run(args)
  if not args.json:
    print(table(report))
  print(json.dumps(report))


if __name__ == "__main__":
  main()
