"""WRN-28-10 (the authors' network) on Fashion-MNIST with AACE-SAM (normalize + Cutout only, as they augment it).

  python train/main.py --config train/configs/wrn28_10_fashion_mnist.py

It reads Fashion-MNIST's IDX files where `train/idx.py` finds them (Debian's
`apt-get install dataset-fashion-mnist`, say) or a prepared TFDS copy.

The same as `train/configs/paper.py:wrn28_10,fashion_mnist,aace_sam`. Our WRN pools globally over
the 7x7 map; the authors' `AvgPool2d(4)` averages only its top-left 4x4 (see docs/paper.md).
"""

from train.configs import paper


def get_config():
  return paper.get_config("wrn28_10,fashion_mnist,aace_sam")
