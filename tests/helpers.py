"""Small models and hand-driven steps shared by the single- and multi-device tests."""

import socket

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import aace_jax


def mlp_apply(params, model_state, images, *, train, rng):
  del train, rng
  hidden = jnp.tanh(images.reshape(len(images), -1) @ params["w1"] + params["b1"])
  return hidden @ params["w2"] + params["b2"], model_state


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


def free_port() -> int:
  """A free TCP port on the loopback interface, for a jax.distributed coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
