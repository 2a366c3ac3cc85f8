"""Evaluates the authors' released PyTorch weights in our Flax model, and saves them as a checkpoint.

  pip install -e ".[torch]"
  python train/evaluate_authors_checkpoint.py --config train/configs/wrn28_10_cifar100.py \\
      --torch_checkpoint wrn_cifar100.pth --workdir runs/authors-wrn-cifar100 \\
      --config.data_dir=$HOME/tensorflow_datasets

Their `test.py` evaluates 8 checkpoints (WRN and PyramidNet on CIFAR-10,
CIFAR-100, Fashion-MNIST and Food101). This maps one of them onto the config's
model (`train/torch_weights.py`: every name and shape checked), prints its test
accuracy, and writes an orbax checkpoint at step 0 in `--workdir`: rerunning
`train/main.py` with the same `--config` and `--workdir` fine-tunes from those
weights. torch is needed only to read a `.pth` file; a `.npz` of the state
dict's arrays works without it.
"""

import os
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make `train` and `aace_jax` importable
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import aace_jax  # noqa: E402
from train import checkpointing  # noqa: E402
from train import config_checks  # noqa: E402
from train import models  # noqa: E402
from train import run_files  # noqa: E402
from train import torch_weights  # noqa: E402
from train import train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("torch_checkpoint", None, "The authors' .pth file (or a .npz of its state dict).", required=True)
flags.DEFINE_string("workdir", None, "Where to write the orbax checkpoint; default: none written.")
config_flags.DEFINE_config_file("config", None, "The paper config whose model the weights are for.", lock_config=True)


def read_state_dict(path: str) -> dict:
  """The checkpoint's tensors as NumPy arrays: a state dict, or a dict holding one, or a whole model."""
  if path.endswith(".npz"):
    with np.load(path) as arrays:
      return dict(arrays)
  try:
    import torch
  except ImportError:
    raise SystemExit('error: reading a .pth file needs torch: pip install -e ".[torch]"') from None
  loaded = torch.load(path, map_location="cpu", weights_only=False)
  if hasattr(loaded, "state_dict"):
    loaded = loaded.state_dict()
  for key in ("state_dict", "model", "model_state_dict"):
    if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
      loaded = loaded[key]
  return {name: tensor.detach().cpu().numpy() for name, tensor in loaded.items()}


def architecture_of(model) -> tuple[str, int]:
  """("wrn" | "pyramidnet", units per group | blocks per stage) of one of our models."""
  if isinstance(model, models.WideResNet):
    return "wrn", model.units_per_group or (model.depth - 4) // 6
  if isinstance(model, models.PyramidNet):
    return "pyramidnet", (model.depth - 2) // (9 if model.bottleneck else 6)
  raise torch_weights.WeightsMismatch(f"model {type(model).__name__} has no counterpart among the authors' networks")


def load_authors_weights(config, state_dict: dict, workdir=None, data=None) -> dict:
  """Maps `state_dict` onto `config.model`, evaluates it, and writes it to `workdir` (if given) at step 0.

  Returns:
    ``{"val_loss", "val_acc"}`` on the config's evaluation split.
  """
  config_checks.check_config(config, with_the_library=False)  # create_experiment checks the method it builds
  experiment = train.create_experiment(config, data)
  architecture, blocks = architecture_of(experiment.model)
  state = experiment.init_state()  # for the optimizer's state layout and the run's key
  template = jax.device_get({"params": state.params, **state.model_state})
  variables = torch_weights.from_authors(state_dict, template, architecture=architecture, blocks=blocks)
  state = aace_jax.replicate_on_mesh(
    aace_jax.TrainState.create(
      params=variables["params"],
      model_state={"batch_stats": variables["batch_stats"]},
      tx=experiment.method.tx,
      rng=jax.random.wrap_key_data(jax.device_get(jax.random.key_data(state.rng))),
    ),
    experiment.mesh,
  )
  val_loss, val_acc = train.evaluate(experiment.eval_step, state, experiment.eval_batches())
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    with run_files.WorkdirLock(workdir):
      run_files.write_config(config, workdir)
      checkpoints = checkpointing.Checkpoints(
        os.path.abspath(os.path.join(workdir, "checkpoints")), config.checkpoint_max_to_keep
      )
      checkpoints.save(state, experiment.totals, checkpointing.empty_history(config.num_epochs))
      checkpoints.wait()
      checkpoints.close()
  return {"val_loss": val_loss, "val_acc": val_acc}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if FLAGS.config is None:
    raise app.UsageError("--config is required: the paper config whose model the weights are for.")
  try:
    result = load_authors_weights(FLAGS.config, read_state_dict(FLAGS.torch_checkpoint), FLAGS.workdir)
  except (*train.RUN_ERRORS, torch_weights.WeightsMismatch) as error:
    sys.exit(f"error: {error}")
  except OSError as error:
    sys.exit(f"error: {error.strerror or error} ({error.filename})")
  where = f"; checkpoint at step 0 in {os.path.abspath(FLAGS.workdir)}" if FLAGS.workdir else ""
  print(
    f"test accuracy {result['val_acc']:.4f}, loss {result['val_loss']:.4f} ({FLAGS.config.model} on"
    f" {FLAGS.config.dataset}, the authors' weights){where}"
  )


if __name__ == "__main__":
  app.run(main)
