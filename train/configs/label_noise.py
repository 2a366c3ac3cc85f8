"""Fashion-MNIST with noisy labels: the regime of the label-noise comparison (docs/experiments.md).

Fixed, with its seeds, methods and radii, before any run of the comparison:

- data: a fixed, class-balanced 2,000-image subset of the training split,
  and 2,000 other training images held out as the validation split (the same
  for every seed and method), no augmentation; the whole 10,000-image test
  split, evaluated after every third epoch, the last, and every epoch with the
  best validation accuracy so far;
- label noise: `get_config("0.4")` gives 40% of the training and validation
  labels a wrong class, symmetric (uniform over the other nine), drawn from
  the seed: every method of a seed sees the same wrong labels; the test
  labels are never changed. "0.0" and "0.2" likewise;
- network: `mnist_cnn_narrow` (16 and 32 channels, 64 hidden units,
  BatchNorm after every hidden layer, 106k parameters); SGD momentum 0.9,
  weight decay 5e-4, lr 0.05 with x0.2 at 30/60/80% of 30 epochs, batch 128.
  SGD memorizes the noisy labels here: in a pilot (seed 1000, outside the
  comparison), its train accuracy on 40% wrong labels reached 100% by epoch
  16 while its validation accuracy fell from 0.47 (epoch 4) to 0.37;
- seeds 42-51 (`--seeds 10` from config.seed 42);
- methods: SGD; SAM at rho 0.05 (normalized); AACE-SAM at rho 0.2
  (unnormalized, the paper's); AACE-SAM normalized at rho 0.05 (SAM's
  radius); and two controls at the radius `PILOT_RADIUS[noise]`, AACE-SAM's
  mean perturbation norm `||w_adv - w||` over the 30 epochs of one pilot
  AACE-SAM run (seed 1000) at that noise level, read from its
  `avg_perturbation` column and nothing else: SAM and AACE-SAM, both
  normalized to that radius. AACE-SAM against the SAM of its size tells its
  direction from its size.

The commands (a workdir outside the repository; rerun to resume):

  python train/compare.py --config train/configs/label_noise.py:0.0 --seeds 10 \\
      --methods sgd,sam,aace_sam,aace_sam:normalize=True:rho=0.05,sam:rho=0.59,aace_sam:normalize=True:rho=0.59 \\
      --baseline sgd,sam,sam:rho=0.59 --workdir runs/label_noise/0.0
  python train/compare.py --config train/configs/label_noise.py:0.2 --seeds 10 \\
      --methods sgd,sam,aace_sam,aace_sam:normalize=True:rho=0.05,sam:rho=0.48,aace_sam:normalize=True:rho=0.48 \\
      --baseline sgd,sam,sam:rho=0.48 --workdir runs/label_noise/0.2
  python train/compare.py --config train/configs/label_noise.py:0.4 --seeds 10 \\
      --methods sgd,sam,aace_sam,aace_sam:normalize=True:rho=0.05,sam:rho=0.43,aace_sam:normalize=True:rho=0.43 \\
      --baseline sgd,sam,sam:rho=0.43 --workdir runs/label_noise/0.4
"""

from train.configs import default

# AACE-SAM's mean perturbation norm in each regime, from the pilot runs (seed 1000, rho 0.2), to two digits.
PILOT_RADIUS = {"0.0": 0.59, "0.2": 0.48, "0.4": 0.43}


def get_config(noise: str = "0.4"):
  config = default.get_config()
  config.dataset = "fashion_mnist"
  config.model = "mnist_cnn_narrow"
  config.train_examples = 2000
  config.validation_examples = 2000
  config.augment = "none"
  config.label_noise = float(noise)
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.learning_rate = 0.05
  config.num_epochs = 30
  config.test_every_epochs = 3
  return config
