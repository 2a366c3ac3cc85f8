"""The authors' runs, one command each: `--config train/configs/paper.py:MODEL,DATASET,METHOD`.

  python train/main.py --config train/configs/paper.py:wrn28_10,cifar100,aace_sam --config.data_dir=$TFDS_DATA_DIR
  python train/main.py --config train/configs/paper.py:wrn28_10,cifar100,sam --config.data_dir=$TFDS_DATA_DIR
  python train/main.py --config train/configs/paper.py:pyramidnet272,food101,sgd --config.data_dir=$TFDS_DATA_DIR
  python train/compare.py --paper wrn28_10 --datasets cifar10,cifar100 --seeds 3 --config.data_dir=$TFDS_DATA_DIR

MODEL is `wrn28_10` (the authors' network: 5 units per group, 46.2M
parameters at 100 classes, batch 256) or `pyramidnet272` (alpha 200, basic
blocks, batch 64); DATASET is cifar10, cifar100, fashion_mnist or food101;
METHOD is what their notebooks ran:

- `aace_sam`: rho 0.2, the unnormalized AACE gradient, 200 epochs;
- `sam`: rho 0.05 with the normalized gradient, 200 epochs;
- `sgd`: 400 epochs, to match the two passes of the others.

Everything else is their recipe: SGD lr 0.1, momentum 0.9, weight decay
5e-4, lr x0.2 at 30/60/80% of the epochs, seed 42, their augmentation per
dataset. The standard 36.5M WRN-28-10 is `--config.model=wrn28_10`.
"""

from train.configs import default

MODELS = {"wrn28_10": ("wrn28_10_authors", 256), "pyramidnet272": ("pyramidnet272", 64)}
DATASETS = ("cifar10", "cifar100", "fashion_mnist", "food101")
METHODS = {
  "aace_sam": {"rho": 0.2, "normalize": False, "num_epochs": 200},
  "sam": {"rho": 0.05, "normalize": True, "num_epochs": 200},
  "sgd": {"num_epochs": 400},
}


def get_config(run: str = "wrn28_10,cifar100,aace_sam"):
  parts = run.split(",")
  if len(parts) != 3 or parts[0] not in MODELS or parts[1] not in DATASETS or parts[2] not in METHODS:
    raise ValueError(
      f"paper config {run!r}: expected MODEL,DATASET,METHOD with MODEL in {sorted(MODELS)}, DATASET in"
      f" {list(DATASETS)}, METHOD in {sorted(METHODS)}"
    )
  model, dataset, method = parts
  config = default.get_config()
  config.model, config.batch_size = MODELS[model]
  config.dataset = dataset
  config.method = method
  for field, value in METHODS[method].items():
    config[field] = value
  return config
