"""`benchmarks/vs_pytorch.py`: its PyTorch restatement takes our step, and the script runs without torch.

The float64 equivalence is what makes the timings comparable: both sides run
the same algorithm. It needs torch (the `bench` extra) and is skipped
without it; the script's run without torch is what CI checks.
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aace_jax
from tests.helpers import load_script
from tests.helpers import make_batch
from tests.helpers import mlp_apply
from tests.helpers import mlp_params

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "vs_pytorch.py"


def load_benchmark():
  return load_script(SCRIPT, "vs_pytorch")


@pytest.mark.parametrize("method", ["sgd", "sam", "aace_sam"])
def test_pytorch_restatement_takes_our_update_in_float64(method):
  torch = pytest.importorskip("torch")
  bench = load_benchmark()
  batch = make_batch()
  params = mlp_params()
  rho = bench.RHO[method]

  model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).double()
  with torch.no_grad():
    for layer, w, b in ((model[0], "w1", "b1"), (model[2], "w2", "b2")):
      layer.weight.copy_(torch.from_numpy(np.asarray(params[w], np.float64).T.copy()))
      layer.bias.copy_(torch.from_numpy(np.asarray(params[b], np.float64)))
  optimizer = bench.torch_optimizer(model)
  images = torch.from_numpy(np.asarray(batch["image"], np.float64))
  labels = torch.from_numpy(np.asarray(batch["label"], np.int64))
  for _ in range(3):
    bench.torch_step(model, optimizer, images, labels, method, rho)

  base = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  tx, perturbation_loss = {
    "sgd": (base, aace_jax.cross_entropy),
    "sam": (aace_jax.sam(base, rho), aace_jax.cross_entropy),
    "aace_sam": (aace_jax.aace_sam(base, rho), aace_jax.aace_cross_entropy),
  }[method]
  with jax.enable_x64(True):
    state = aace_jax.TrainState.create(
      params=jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params), tx=tx, rng=jax.random.key(0)
    )
    step = jax.jit(aace_jax.make_train_step(mlp_apply, tx, perturbation_loss=perturbation_loss))
    f64_batch = {"image": jnp.asarray(batch["image"], jnp.float64), "label": batch["label"]}
    for _ in range(3):
      state, _ = step(state, f64_batch)
    ours = jax.tree.map(np.asarray, state.params)
  theirs = {
    "w1": model[0].weight.detach().numpy().T,
    "b1": model[0].bias.detach().numpy(),
    "w2": model[2].weight.detach().numpy().T,
    "b2": model[2].bias.detach().numpy(),
  }
  for k in ours:
    assert ours[k].dtype == np.float64
    np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-10, atol=1e-12, err_msg=k)
  assert np.abs(ours["w2"] - np.asarray(params["w2"])).max() > 1e-3


def test_torch_wide_resnet_has_our_parameter_count():
  pytest.importorskip("torch")
  from train import models

  bench = load_benchmark()
  torch_model = bench.torch_wide_resnet(16, 4, 100)
  variables = jax.eval_shape(
    lambda: models.create_model("wrn16_4", 100).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  assert sum(p.numel() for p in torch_model.parameters()) == ours


def test_runs_without_torch_and_says_so():
  # torch made unimportable, as on a machine without the bench extra.
  runner = (
    "import sys, runpy; sys.modules['torch'] = None; sys.argv = sys.argv[1:];"
    f" runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
  )
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      runner,
      str(SCRIPT),
      "--model",
      "small_cnn",
      "--batch",
      "4",
      "--steps",
      "1",
      "--image_size",
      "8",
      "--num_classes",
      "10",
    ],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "the PyTorch side is skipped" in result.stdout
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["torch"] is False
  assert set(report["results"]) == {f"{i}:{m}" for i in ("jax_fp32", "jax_bf16") for m in ("sgd", "sam", "aace_sam")}
  assert all(r["seconds_per_step"] > 0 for r in report["results"].values())
  assert report["ratios"] == {}


def test_bad_arguments_are_rejected():
  result = subprocess.run([sys.executable, str(SCRIPT), "--batch", "0"], capture_output=True, text=True)
  assert result.returncode == 2 and "--batch and --steps must be positive, got 0" in result.stderr
