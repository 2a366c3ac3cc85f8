"""WRN-28-10 on CIFAR-100 with AACE-SAM, the paper's headline recipe (84.33% reported).

  python train/main.py --config train/configs/wrn28_10_cifar100.py --config.data_dir=$TFDS_DATA_DIR
  python train/main.py --config train/configs/wrn28_10_cifar100.py --config.optimizer=sam  # the 83.52% baseline
"""

from train.configs import wrn28_10_cifar10


def get_config():
  config = wrn28_10_cifar10.get_config()
  config.dataset = "cifar100"
  return config
