"""What several test modules share: small models and problems, hand-driven steps, trainer runs and checkpoints."""

import atexit
import csv
import importlib.util
import os
import pathlib
import shlex
import shutil
import socket
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import aace_jax
from train.configs import default


def load_script(path, name: str):
  """The module of a script that is not a package's (an example, a benchmark), loaded from its path."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def without_keys(tree):
  """`tree` with its PRNG keys as their key data, for chex's and NumPy's comparisons of numbers."""
  is_key = lambda x: isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def jax_mlp(params, x):
  """The tanh MLP every library test trains; `np_mlp_grads` in test_sam.py back-propagates it by hand."""
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  return hidden @ params["w2"] + params["b2"]


def mlp_apply(params, model_state, images, *, train, rng):
  """`jax_mlp` as an `aace_jax.ApplyFn`."""
  del train, rng
  return jax_mlp(params, images.reshape(len(images), -1)), model_state


def np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def mlp_params(seed=0, features=12, hidden=16, classes=5):
  keys = jax.random.split(jax.random.key(seed), 2)
  return {
    "w1": jax.random.normal(keys[0], (features, hidden)) * 0.5,
    "b1": jnp.zeros(hidden),
    "w2": jax.random.normal(keys[1], (hidden, classes)) * 0.5,
    "b2": jnp.zeros(classes),
  }


def make_batch(n=32, features=12, classes=5, seed=1):
  rng = np.random.default_rng(seed)
  return {
    "image": jnp.asarray(rng.normal(size=(n, 3, 4)), jnp.float32).reshape(n, features),
    "label": jnp.asarray(rng.integers(0, classes, n), jnp.int32),
  }


def hand_step(tx, params, opt_state, batch, perturbation_loss):
  """The core transformation driven by hand: no make_train_step."""

  def mean_loss(p, fn):
    return fn(mlp_apply(p, {}, batch["image"], train=True, rng=None)[0], batch["label"]).mean()

  grads = jax.grad(mean_loss)(params, perturbation_loss)
  updates, opt_state = tx.update(
    grads, opt_state, params, grad_fn=lambda w: jax.grad(mean_loss)(w, aace_jax.cross_entropy)
  )
  return optax.apply_updates(params, updates), opt_state


class BatchNormNet(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(5)(nn.relu(x))


def first_pass_batch_stats(model, variables, images):
  """BatchNorm statistics after one training pass of `model` at its initial parameters."""
  _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
  return updates["batch_stats"]


# A next-token model: a batch of any structure, a target per token, a padding mask.
VOCAB, WIDTH, TOKEN_LENGTH = 7, 5, 6


def token_params(seed=0):
  keys = jax.random.split(jax.random.key(seed), 2)
  return {
    "embed": jax.random.normal(keys[0], (VOCAB, WIDTH)),
    "out": jax.random.normal(keys[1], (WIDTH, VOCAB)) * 0.5,
  }


def token_logits(params, tokens):
  return jnp.tanh(params["embed"][tokens]) @ params["out"]


def next_token_fn(params, model_state, batch, *, train, rng):
  """A next-token model: predicts tokens[:, 1:] from tokens[:, :-1]; `lengths` marks the real tokens."""
  del train, rng
  tokens = batch["tokens"]
  positions = jnp.arange(tokens.shape[1] - 1)
  weights = (positions[None, :] + 1 < batch["lengths"][:, None]).astype(jnp.float32)
  return aace_jax.LossInputs(token_logits(params, tokens[:, :-1]), tokens[:, 1:], weights, model_state)


def token_batch(n=8, seed=3, pad=-1):
  """Sequences of random lengths in [2, TOKEN_LENGTH]; positions past a sequence's end hold `pad`."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, TOKEN_LENGTH + 1, n)
  tokens = rng.integers(0, VOCAB, (n, TOKEN_LENGTH))
  tokens = np.where(np.arange(TOKEN_LENGTH)[None, :] < lengths[:, None], tokens, pad)
  return {"tokens": jnp.asarray(tokens, jnp.int32), "lengths": jnp.asarray(lengths, jnp.int32)}


def make_mlp_problem(seed=0, batch=16, features=5, hidden=7, classes=4):
  rng = np.random.default_rng(seed)
  params = {
    "w1": rng.normal(size=(features, hidden)) * 0.8,
    "b1": rng.normal(size=hidden) * 0.1,
    "w2": rng.normal(size=(hidden, classes)) * 0.8,
    "b2": rng.normal(size=classes) * 0.1,
  }
  x = rng.normal(size=(batch, features))
  y = rng.integers(0, classes, size=batch)
  return params, x, y


def run_library(tx, params, x, y, steps, perturbation_loss, transform=jax.jit):
  """`steps` updates of `tx` on the MLP, each step wrapped in `transform` (a chex variant, or jax.jit)."""

  def batch_loss(params, fn):
    return fn(jax_mlp(params, x), y).mean()

  @transform
  def step(params, state):
    grads = jax.grad(batch_loss)(params, perturbation_loss)
    updates, state = tx.update(grads, state, params, grad_fn=jax.grad(lambda w: batch_loss(w, aace_jax.cross_entropy)))
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def free_port() -> int:
  """A free TCP port on the loopback interface, for a jax.distributed coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# ---------------------------------------------------------------------------
# Trainer runs.
# ---------------------------------------------------------------------------

REPO = pathlib.Path(__file__).resolve().parents[1]
# train/main.py's runs in a subprocess: the digits, 3 epochs of batch 32.
# The trainers these tests launch share one compilation cache, made for this session: a launch after the first
# loads its compiled steps (the same programs, so the same numbers) instead of compiling them again.
XLA_CACHE = tempfile.mkdtemp(prefix="aace_jax_tests_xla_")
atexit.register(shutil.rmtree, XLA_CACHE, ignore_errors=True)
ARGS = ["--config.num_epochs=3", "--config.batch_size=32", f"--config.compilation_cache_dir={XLA_CACHE}"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1")
STEPS_PER_EPOCH = 1438 // 32


def main_command(workdir, *extra):
  return [sys.executable, str(REPO / "train" / "main.py"), "--workdir", str(workdir), *ARGS, *extra]


def without_file_permission_override(command: list) -> list:
  """`command` run as this user without the capabilities that let root read any file (CI runs as root),
  or a skip where they cannot be dropped."""
  if os.geteuid() != 0:
    return command
  if shutil.which("capsh") is None:
    pytest.skip("needs capsh (libcap2-bin) to drop root's file-permission override")
  shell = " ".join(shlex.quote(str(part)) for part in command)
  return ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shell]


def small_config(**overrides):
  config = default.get_config()
  config.num_epochs = 2
  config.batch_size = 64
  config.eval_batch_size = 128
  config.log_every_steps = 5
  for key, value in overrides.items():
    config[key] = value
  return config


def read_csv(workdir):
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    return list(csv.DictReader(f))


def latest_checkpoint(workdir):
  """The newest checkpoint as NumPy arrays of the stored dtypes (float64 history included), whatever device
  layout wrote it."""
  manager = ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, "checkpoints")), item_handlers=ocp.StandardCheckpointHandler()
  )
  step = manager.latest_step()
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), manager.item_metadata(step))
  tree = manager.restore(step, args=ocp.args.StandardRestore(target))
  manager.close()
  return step, tree


def assert_same_checkpoint(workdir_a, workdir_b, *, rtol=0.0, atol=0.0):
  """The newest checkpoints of two workdirs are at the same step and hold the same arrays (bit for bit by
  default), compared leaf by leaf under their paths."""
  step_a, tree_a = latest_checkpoint(workdir_a)
  step_b, tree_b = latest_checkpoint(workdir_b)
  assert step_a == step_b
  leaves_a, leaves_b = ocp.tree.to_flat_dict(tree_a), ocp.tree.to_flat_dict(tree_b)
  assert leaves_a.keys() == leaves_b.keys()
  for key in leaves_a:
    np.testing.assert_allclose(leaves_a[key], leaves_b[key], rtol=rtol, atol=atol, err_msg=str(key))
