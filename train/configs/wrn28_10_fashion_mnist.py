"""WRN-28-10 on Fashion-MNIST with AACE-SAM (normalize + Cutout only, as the authors augment it).

  python train/main.py --config train/configs/wrn28_10_fashion_mnist.py --config.data_dir=$TFDS_DATA_DIR
"""

from train.configs import wrn28_10_cifar10


def get_config():
  config = wrn28_10_cifar10.get_config()
  config.dataset = "fashion_mnist"
  return config
