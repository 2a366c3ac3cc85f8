"""WRN-28-10 on Food101 resized to 32x32 with AACE-SAM (pad to square, resize, flip, Cutout).

  python train/main.py --config train/configs/wrn28_10_food101.py --config.data_dir=$TFDS_DATA_DIR
"""

from train.configs import wrn28_10_cifar10


def get_config():
  config = wrn28_10_cifar10.get_config()
  config.dataset = "food101"
  return config
