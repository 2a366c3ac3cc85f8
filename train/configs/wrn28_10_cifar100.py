"""WRN-28-10 (the authors' 46.2M network) on CIFAR-100 with AACE-SAM, the paper's headline (84.33% reported).

  python train/main.py --config train/configs/wrn28_10_cifar100.py --config.data_dir=$TFDS_DATA_DIR
  python train/main.py --config train/configs/paper.py:wrn28_10,cifar100,sam  # the 83.52% baseline

The same as `train/configs/paper.py:wrn28_10,cifar100,aace_sam`.
"""

from train.configs import paper


def get_config():
  return paper.get_config("wrn28_10,cifar100,aace_sam")
