"""PyramidNet-272 (alpha 200, basic blocks) on CIFAR-100 with AACE-SAM: batch 64, 200 epochs.

  python train/main.py --config train/configs/pyramidnet272_cifar100.py --config.data_dir=$TFDS_DATA_DIR
  python train/main.py --config train/configs/paper.py:pyramidnet272,cifar10,aace_sam

The same as `train/configs/paper.py:pyramidnet272,cifar100,aace_sam`.
"""

from train.configs import paper


def get_config():
  return paper.get_config("pyramidnet272,cifar100,aace_sam")
