"""PyramidNet-272 (alpha 200, basic blocks) on CIFAR-100 with AACE-SAM: batch 64, 200 epochs.

  python train/main.py --config train/configs/pyramidnet272_cifar100.py --config.data_dir=$TFDS_DATA_DIR
  python train/main.py --config train/configs/pyramidnet272_cifar100.py --config.dataset=cifar10
"""

from train.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "cifar100"
  config.model = "pyramidnet272"
  config.batch_size = 64
  config.num_epochs = 200
  return config
