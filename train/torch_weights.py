"""The authors' PyTorch weights in our Flax models: a name map, checked shape by shape (NumPy only).

Their networks (T-Ratchatorn/AACE, `model/wide_res_net_cifar.py` and
`model/PyramidNet.py`) compute what `models.WideResNet(units_per_group=(depth
- 4) // 6 + 1)` and `models.PyramidNet` compute; only the names and layouts
differ. Convolutions go from torch's (out, in, h, w) to Flax's (h, w, in,
out), linear weights are transposed, and BatchNorm's weight, bias,
running_mean and running_var become scale, bias, mean and var
(`num_batches_tracked` has no counterpart). Reading the `.pth` file needs
torch: `train/evaluate_authors_checkpoint.py` does that, this module does not.
"""

import re

import numpy as np

BATCH_NORM = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


class WeightsMismatch(ValueError):
  """A state dict that does not fit the model: a name without counterpart, another shape, a missing tensor."""


def _wrn_names(torch_name: str, units_per_group: int):
  """Flax (collection, path, kind) of one tensor of the authors' `WideResNet_cifar`, or None to skip."""
  if torch_name.endswith("num_batches_tracked"):
    return None
  match = re.fullmatch(r"f\.(\d)_block\.block\.(\d+)\.(.+)\.(\w+)", torch_name)
  if match:
    group, unit, layer, field = int(match[1]) - 1, int(match[2]), match[3], match[4]
    module = f"WideResNetUnit_{group * units_per_group + unit}"
    if unit == 0:  # DownsampleUnit: the 1x1 shortcut conv is our unit's first conv
      layers = {
        "norm_act.0_normalization": "BatchNorm_0",
        "block.0_convolution": "Conv_1",
        "block.1_normalization": "BatchNorm_1",
        "block.4_convolution": "Conv_2",
        "downsample": "Conv_0",
      }
    else:  # BasicUnit
      layers = {
        "block.0_normalization": "BatchNorm_0",
        "block.2_convolution": "Conv_0",
        "block.3_normalization": "BatchNorm_1",
        "block.6_convolution": "Conv_1",
      }
    if layer not in layers:
      raise KeyError(torch_name)
    return _leaf(module, layers[layer], field)
  top = {"f.0_convolution": "Conv_0", "f.4_normalization": "BatchNorm_0", "f.8_classification": "Dense_0"}
  layer, _, field = torch_name.rpartition(".")
  if layer not in top:
    raise KeyError(torch_name)
  return _leaf(None, top[layer], field)


def _pyramid_names(torch_name: str, blocks_per_stage: int):
  """Flax (collection, path, kind) of one tensor of the authors' `PyramidNet`, or None to skip."""
  if torch_name.endswith("num_batches_tracked"):
    return None
  match = re.fullmatch(r"layer(\d)\.(\d+)\.(bn|conv)(\d)\.(\w+)", torch_name)
  if match:
    block = (int(match[1]) - 1) * blocks_per_stage + int(match[2])
    kind = "BatchNorm" if match[3] == "bn" else "Conv"
    return _leaf(f"PyramidBlock_{block}", f"{kind}_{int(match[4]) - 1}", match[5])
  top = {"conv1": "Conv_0", "bn1": "BatchNorm_0", "bn_final": "BatchNorm_1", "fc": "Dense_0"}
  layer, _, field = torch_name.rpartition(".")
  if layer not in top:
    raise KeyError(torch_name)
  return _leaf(None, top[layer], field)


def _leaf(module, layer: str, field: str):
  path = (module,) if module else ()
  if layer.startswith("BatchNorm"):
    name = BATCH_NORM[field]
    collection = "params" if name in ("scale", "bias") else "batch_stats"
    return collection, (*path, layer, name), "vector"
  if layer.startswith("Conv"):
    return "params", (*path, layer, "kernel"), "conv"
  return (
    "params",
    (*path, layer, "kernel" if field == "weight" else "bias"),
    "linear" if field == "weight" else "vector",
  )


def _convert(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return np.transpose(value, (2, 3, 1, 0))
  if kind == "linear":
    return value.T
  return value


def from_authors(state_dict: dict, variables: dict, *, architecture: str, blocks: int) -> dict:
  """Our Flax variables holding the authors' weights.

  Args:
    state_dict: their ``model.state_dict()`` as NumPy arrays (an optional
      ``module.`` prefix, from ``DataParallel``, is dropped).
    variables: our model's variables (``{"params", "batch_stats"}``), for the
      names and shapes to fill; every one must be filled.
    architecture: ``"wrn"`` or ``"pyramidnet"``.
    blocks: WRN units per group, or PyramidNet blocks per stage.

  Returns:
    Variables of the same structure, dtypes and shapes as ``variables``.

  Raises:
    ValueError: naming a tensor that has no counterpart, a shape that
      differs, or one of our variables that no tensor fills.
  """
  names = {"wrn": _wrn_names, "pyramidnet": _pyramid_names}[architecture]
  filled = {}
  for torch_name, value in state_dict.items():
    torch_name = torch_name.removeprefix("module.")
    try:
      target = names(torch_name, blocks)
    except KeyError:
      raise WeightsMismatch(f"the checkpoint's {torch_name!r} has no counterpart in our {architecture}") from None
    if target is None:
      continue
    collection, path, kind = target
    value = _convert(np.asarray(value), kind)
    expected = _lookup(variables, collection, path, torch_name)
    if value.shape != expected.shape:
      raise WeightsMismatch(
        f"the checkpoint's {torch_name!r} has shape {value.shape} (converted), ours"
        f" {collection}/{'/'.join(path)} has {expected.shape}: another depth, width or class count?"
      )
    filled[(collection, *path)] = value.astype(expected.dtype)
  result = {}
  for collection, tree in variables.items():
    result[collection] = _fill(tree, (collection,), filled)
  return result


def _lookup(variables, collection, path, torch_name):
  node = variables.get(collection, {})
  for key in path:
    if key not in node:
      raise WeightsMismatch(
        f"the checkpoint's {torch_name!r} maps to {collection}/{'/'.join(path)}, which our model lacks"
      )
    node = node[key]
  return node


def _fill(tree, prefix, filled):
  if isinstance(tree, dict):
    return {key: _fill(value, (*prefix, key), filled) for key, value in tree.items()}
  if prefix not in filled:
    raise WeightsMismatch(f"no tensor of the checkpoint fills our {'/'.join(prefix)}")
  return filled[prefix]
