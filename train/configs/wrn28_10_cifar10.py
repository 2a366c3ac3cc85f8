"""WRN-28-10 (the authors' 46.2M network) on CIFAR-10 with AACE-SAM: 200 epochs, batch 256, rho 0.2.

  python train/main.py --config train/configs/wrn28_10_cifar10.py --config.data_dir=$TFDS_DATA_DIR

The same as `train/configs/paper.py:wrn28_10,cifar10,aace_sam`, which also gives the SAM and SGD runs.
"""

from train.configs import paper


def get_config():
  return paper.get_config("wrn28_10,cifar10,aace_sam")
