"""WRN-28-10 on CIFAR-10 with AACE-SAM, the paper's recipe (200 epochs, batch 256, rho 0.2).

  python train/main.py --config train/configs/wrn28_10_cifar10.py --config.data_dir=$TFDS_DATA_DIR
"""

from train.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "cifar10"
  config.model = "wrn28_10"
  config.batch_size = 256
  config.num_epochs = 200
  return config
