"""A byte-level causal transformer trained with AACE-SAM over tokens, its state sharded over the devices.

    python examples/language_model.py --host_devices 8 --steps 60

The text is the repository's LICENSE, cut into its lines: sequences of
different lengths, padded to one length, so each batch carries a padding
mask. `logits_fn` returns one prediction per position (the next byte) with
its weight (1 for a real byte, 0 for padding), and `make_train_step`
averages both of AACE-SAM's losses over the real bytes. The parameters and
the optimizer state are sharded FSDP-style over every device
(`aace_jax.fsdp_sharding`), the batch is split over the same axis, and
`aace_jax.shard_step(..., state_sharding=...)` keeps that layout from step
to step. `--host_devices N` makes this CPU look like N devices (it sets
XLA_FLAGS before JAX starts). The last line printed is a JSON summary:
the training loss of the first and last steps, the held-out loss in bits
per byte before and after, and how the parameters are laid out.
"""

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--batch", type=int, default=32, help="sequences per step, split over the devices")
  parser.add_argument("--length", type=int, default=64, help="bytes per sequence (longer lines are cut)")
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--learning_rate", type=float, default=3e-3)
  parser.add_argument("--rho", type=float, default=0.05, help="AACE-SAM's perturbation size")
  parser.add_argument("--host_devices", type=int, help="run on this many CPU devices (sets XLA_FLAGS)")
  parser.add_argument("--text", default=str(ROOT / "LICENSE"))
  args = parser.parse_args(argv)
  for name in ("steps", "batch", "length", "width", "layers", "heads"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be positive, got {getattr(args, name)}")
  if args.width % args.heads:
    parser.error(f"--width {args.width} must be a multiple of --heads {args.heads}")
  if args.host_devices is not None and args.host_devices < 1:
    parser.error(f"--host_devices must be positive, got {args.host_devices}")
  return args


def text_sequences(path: str, length: int):
  """The text's non-empty lines as bytes, cut to `length + 1`, padded with 0: tokens [n, length + 1] and lengths."""
  import numpy as np

  lines = [line.strip().encode() for line in pathlib.Path(path).read_text().splitlines()]
  lines = [line[: length + 1] for line in lines if len(line) >= 2]
  tokens = np.zeros((len(lines), length + 1), np.int32)
  for row, line in enumerate(lines):
    tokens[row, : len(line)] = np.frombuffer(line, np.uint8)
  return tokens, np.array([len(line) for line in lines], np.int32)


def build(args):
  """The model, its `logits_fn`, and the AACE-SAM transformation."""
  import flax.linen as nn
  import jax.numpy as jnp
  import optax

  import aace_jax

  class Block(nn.Module):
    width: int
    heads: int

    @nn.compact
    def __call__(self, x, mask):
      y = nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x), mask=mask)
      x = x + y
      y = nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(x))))
      return x + y

  class CausalTransformer(nn.Module):
    width: int
    heads: int
    layers: int
    length: int

    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(256, self.width)(tokens)
      x = x + self.param("positions", nn.initializers.normal(0.02), (self.length, self.width))[: tokens.shape[1]]
      # Causal: a position sees itself and the bytes before it, so a real byte never sees the padding after it.
      mask = nn.make_causal_mask(tokens)
      for _ in range(self.layers):
        x = Block(self.width, self.heads)(x, mask)
      return nn.Dense(256)(nn.LayerNorm()(x))

  model = CausalTransformer(args.width, args.heads, args.layers, args.length)

  def logits_fn(params, model_state, batch, *, train, rng):
    del train, rng  # no dropout, no BatchNorm
    tokens = batch["tokens"]
    predicted = jnp.arange(1, tokens.shape[1])  # position t predicts byte t from bytes < t
    weights = (predicted[None, :] < batch["lengths"][:, None]).astype(jnp.float32)
    logits = model.apply({"params": params}, tokens[:, :-1])
    return aace_jax.LossInputs(logits, tokens[:, 1:], weights, model_state)

  tx = aace_jax.aace_sam(optax.adamw(args.learning_rate, weight_decay=1e-4), args.rho)
  return model, logits_fn, tx


def main(argv=None):
  args = parse_args(argv)
  if args.host_devices:
    if "jax" in sys.modules:
      raise SystemExit("language_model: --host_devices must be set before JAX is imported.")
    os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={args.host_devices}"]
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np

  import aace_jax

  start = time.perf_counter()
  tokens, lengths = text_sequences(args.text, args.length)
  devices = jax.device_count()
  if args.batch % devices:
    raise SystemExit(f"language_model: --batch {args.batch} does not split over {devices} devices.")
  held_out = np.arange(len(tokens)) % 10 == 0  # every tenth line
  train_tokens, train_lengths = tokens[~held_out], lengths[~held_out]
  eval_count = int(held_out.sum()) // devices * devices
  eval_batch = {"tokens": tokens[held_out][:eval_count], "lengths": lengths[held_out][:eval_count]}

  model, logits_fn, tx = build(args)
  mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

  def make_state():
    params = model.init(jax.random.key(0), train_tokens[:1, :-1])["params"]
    return aace_jax.TrainState.create(params=params, tx=tx, rng=jax.random.key(1))

  sharding = aace_jax.fsdp_sharding(jax.eval_shape(make_state), mesh, "data", min_size=0)
  state = jax.jit(make_state, out_shardings=sharding)()  # created sharded, never whole on one device
  train_step = aace_jax.shard_step(
    aace_jax.make_train_step(tx=tx, logits_fn=logits_fn), mesh, "data", state_sharding=sharding
  )
  eval_step = aace_jax.shard_step(aace_jax.make_eval_step(logits_fn=logits_fn), mesh, "data", state_sharding=sharding)

  def held_out_bits_per_byte(state):
    sums = jax.device_get(eval_step(state, eval_batch))
    return float(sums["loss_sum"] / sums["count"] / np.log(2))

  before = held_out_bits_per_byte(state)
  order = np.random.default_rng(0)
  losses = []
  for _ in range(args.steps):
    rows = order.choice(len(train_tokens), args.batch, replace=False)
    state, metrics = train_step(state, {"tokens": train_tokens[rows], "lengths": train_lengths[rows]})
    losses.append(metrics["loss"])
  losses = [float(x) for x in jax.device_get(losses)]
  leaves = jax.tree.leaves(state.params)
  summary = {
    "devices": devices,
    "steps": args.steps,
    "first_loss": losses[0],
    "last_loss": losses[-1],
    "held_out_bits_per_byte_before": before,
    "held_out_bits_per_byte_after": held_out_bits_per_byte(state),
    "parameters": int(sum(x.size for x in leaves)),
    "parameter_leaves": len(leaves),
    "sharded_parameter_leaves": sum(not x.sharding.is_fully_replicated for x in leaves),
    "largest_parameter_shard_fraction": max(x.addressable_shards[0].data.size / x.size for x in leaves),
    "seconds": time.perf_counter() - start,
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
