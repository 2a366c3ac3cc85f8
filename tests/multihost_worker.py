"""One process of the multi-host test: 3 AACE-SAM steps of `shard_step` over 8 CPU devices.

Usage: python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
The 8 devices are split evenly over the processes; each process feeds only
its own rows of the global batch. Process 0 writes the final parameters.
"""

import os
import sys

process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // num_processes}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if num_processes > 1:
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import aace_jax  # noqa: E402
from tests.helpers import make_batch  # noqa: E402
from tests.helpers import mlp_apply  # noqa: E402
from tests.helpers import mlp_params  # noqa: E402

assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
tx = aace_jax.aace_sam(optax.sgd(0.1, momentum=0.9), 0.2)
step = aace_jax.shard_step(aace_jax.make_train_step(mlp_apply, tx, axis_name="data"), mesh)
state = aace_jax.TrainState.create(params=mlp_params(), tx=tx, rng=jax.random.key(0))
state = aace_jax.replicate_on_mesh(state, mesh)

global_batch = jax.tree.map(np.asarray, make_batch(n=64))
rows = 64 // num_processes
local_batch = jax.tree.map(lambda x: x[process_id * rows : (process_id + 1) * rows], global_batch)
batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), x), local_batch)
for _ in range(3):
  state, metrics = step(state, batch)
params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)
if process_id == 0:
  np.savez(out, loss=np.asarray(metrics["loss_at_w_adv"].addressable_data(0)), **params)
print(f"process {process_id}: done")
