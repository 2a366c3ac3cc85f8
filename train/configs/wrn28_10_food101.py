"""WRN-28-10 (the authors' network) on Food101 resized to 32x32 with AACE-SAM (pad, resize, flip, Cutout).

  python train/main.py --config train/configs/wrn28_10_food101.py --config.data_dir=$TFDS_DATA_DIR

The same as `train/configs/paper.py:wrn28_10,food101,aace_sam`.
"""

from train.configs import paper


def get_config():
  return paper.get_config("wrn28_10,food101,aace_sam")
