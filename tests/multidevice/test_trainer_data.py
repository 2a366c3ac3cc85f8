"""The trainer's device-side data path on 8 fake CPU devices: the same batches as on one device.

Run through tests/test_multidevice.py, which sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from train import augment
from train import input_pipeline
from train import train
from train.configs import default

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_augmentation_does_not_depend_on_the_device_count():
  images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
  positions = jnp.arange(64) + 640

  def batch(images, positions):
    return augment.augment_batch(images, seed=3, epoch=2, positions=positions, kind="cifar", mean=MEAN, std=STD)

  first = jax.devices()[0]
  one_device = jax.jit(batch)(jax.device_put(images, first), jax.device_put(positions, first))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  split = NamedSharding(mesh, P("data"))
  sharded = jax.jit(batch, out_shardings=split)(jax.device_put(images, split), jax.device_put(positions, split))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(one_device))


def test_trainer_batches_on_eight_devices_match_the_split_on_the_devices(tmp_path):
  """Host-fed batches sharded over 8 devices and batches gathered from a split held on them: one run."""
  config = default.get_config()
  config.num_epochs, config.batch_size, config.eval_batch_size = 1, 64, 128
  results = {}
  for on_device in (False, True):
    config.data_on_device = on_device
    workdir = str(tmp_path / str(on_device))
    results[on_device] = train.train_and_evaluate(config, workdir)
  for column in ("train_loss", "avg_ce_loss", "val_loss", "val_acc"):
    assert results[False][column] == results[True][column], column


def test_eval_covers_every_record_on_eight_devices():
  data = input_pipeline.create_data("digits", global_batch=64, global_eval_batch=64, seed=0)
  assert len(data.eval) % 64  # a padded last batch
  config = default.get_config()
  config.batch_size = config.eval_batch_size = 64
  experiment = train.create_experiment(config, data)
  state = experiment.init_state()
  counts = [float(experiment.eval_step(state, batch)["count"]) for batch in experiment.eval_batches()]
  assert sum(counts) == len(data.eval)
