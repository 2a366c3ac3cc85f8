"""What the host adds to every step: the input pipeline, and the trainer against its compiled step alone.

    python benchmarks/input_pipeline.py --json
    python benchmarks/input_pipeline.py --model wrn28_10 --method aace_sam --dtype bfloat16 --json   # a GPU

On `--num_train` random CIFAR-shaped uint8 images held in memory (32x32x3,
100 classes, the cifar100 augmentation), batch `--batch`:

- `host_images_per_sec`: the trainer's host iterator alone (gathers of stored
  images and labels), no step, no transfer;
- `trainer_images_per_sec`: `train.train_and_evaluate` itself (pipeline,
  transfer, its compiled step, metrics, progress bar), the median of the
  epochs after the first (which compiles), from its own CSV;
- `step_images_per_sec`: the same compiled trainer step (augmentation
  included) fed one batch already on the device, back to back;
- `host_ms_per_step` = 1000 x batch x (1/trainer - 1/step).

`--model` defaults to `linear`, the cheapest step, so that the host's share is
not hidden behind a slow step. The last line printed is a JSON object.
"""

import argparse
import csv
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import timing  # noqa: E402 (a sibling module, importable once its folder is on the path)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="linear", help="a model name of train/models.py")
  timing.add_method_argument(parser, default="sgd")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--num_train", type=int, default=50_000, help="training images held in memory")
  parser.add_argument("--epochs", type=int, default=3, help="trainer epochs; the first (compiling) is not timed")
  parser.add_argument("--data_on_device", action="store_true", help="the trainer's split-on-device mode")
  parser.add_argument("--json", action="store_true", help="print only the JSON object")
  args = parser.parse_args(argv)
  timing.take_old_method(args)
  if args.batch < 1 or args.num_train < args.batch or args.epochs < 2:
    parser.error(
      f"need --batch >= 1, --num_train >= --batch and --epochs >= 2; got {args.batch}, {args.num_train}, {args.epochs}"
    )
  return args


def random_cifar(args):
  """`Data` over random uint8 CIFAR-100-shaped images in memory, as the trainer holds a decoded split."""
  import numpy as np

  from train import input_pipeline

  rng = np.random.default_rng(0)
  spec = input_pipeline.get_spec("cifar100")

  def split(count):
    images = rng.integers(0, 256, (count, *spec.image_shape), dtype=np.uint8)
    return input_pipeline.Split(images, rng.integers(0, spec.num_classes, count).astype(np.int32))

  return input_pipeline.Data(
    spec=spec,
    train=split(args.num_train),
    eval=split(args.batch),
    per_host_batch=args.batch,
    per_host_eval_batch=args.batch,
    seed=0,
    mean=spec.mean,
    std=spec.std,
  )


def trainer_config(args):
  from train.configs import default

  config = default.get_config()
  config.dataset = "cifar100"
  config.model, config.method, config.dtype = args.model, args.method, args.dtype
  config.batch_size = config.eval_batch_size = args.batch
  config.num_epochs = args.epochs
  config.log_every_steps = 50
  config.data_on_device = args.data_on_device
  return config


def host_images_per_sec(data, epochs: int = 2) -> float:
  start = time.perf_counter()
  count = 0
  for epoch in range(epochs):
    for batch in data.train_batches(epoch):
      count += len(batch["label"])
  return count / (time.perf_counter() - start)


def trainer_images_per_sec(args, data) -> float:
  from train import train

  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(trainer_config(args), workdir, data=data)
    with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
      rows = list(csv.DictReader(f))
  return statistics.median(float(row["images_per_sec"]) for row in rows[1:])


def step_images_per_sec(args, data, repeats: int = 3) -> float:
  """The trainer's compiled step, fed its first batch (already on the device) again and again."""
  import jax

  from train import train

  experiment = train.create_experiment(trainer_config(args), data)
  state, totals, step = experiment.init_state(), experiment.totals, experiment.train_step
  batch = next(iter(experiment.train_batches(0, 0)))
  state, totals, metrics = step(state, totals, batch)  # compile
  jax.block_until_ready((state, metrics))
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(data.steps_per_epoch):
      state, totals, metrics = step(state, totals, batch)
    jax.block_until_ready((state, metrics))
    rates.append(data.steps_per_epoch * args.batch / (time.perf_counter() - start))
  return statistics.median(rates)


def machine() -> dict:
  import jax

  device = jax.devices()[0]
  return {
    "backend": jax.default_backend(),
    "device": device.device_kind,
    "device_count": jax.device_count(),
    "cpu": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
  }


def main(argv=None):
  args = parse_args(argv)
  data = random_cifar(args)
  host = host_images_per_sec(data)
  trainer = trainer_images_per_sec(args, data)
  step = step_images_per_sec(args, data)
  report = {
    "model": args.model,
    "method": args.method,
    "dtype": args.dtype,
    "batch": args.batch,
    "num_train": args.num_train,
    "data_on_device": args.data_on_device,
    "host_images_per_sec": round(host),
    "trainer_images_per_sec": round(trainer),
    "step_images_per_sec": round(step),
    "trainer_over_step": round(trainer / step, 3),
    "host_ms_per_step": round(1000 * args.batch * (1 / trainer - 1 / step), 3),
    "machine": machine(),
  }
  if not args.json:
    for key, value in report.items():
      print(f"{key}: {value}")
  print(json.dumps(report))


if __name__ == "__main__":
  main()
