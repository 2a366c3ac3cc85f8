"""The offline default: AACE-SAM on scikit-learn's bundled 8x8 digits with a small CNN.

Runs in about a minute on 2 CPU cores, with no download:

  python train/main.py
  python train/main.py --config train/configs/default.py --config.method=sgd

Every field below exists in every config; the paper's configs import this one
and change only what differs.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data.
  config.dataset = "digits"  # digits | mnist | fashion_mnist | cifar10 | cifar100 | food101
  # A TFDS data dir, or (mnist, fashion_mnist) a folder with the four IDX files; None: the usual places
  # ($TFDS_DATA_DIR or ~/tensorflow_datasets, then train/idx.py's search_roots for the IDX files).
  config.data_dir = config_dict.placeholder(str)
  config.train_examples = config_dict.placeholder(int)  # None: the whole training split; N: a fixed balanced subset
  # N: a fixed, class-balanced part of the training split held out as the validation split, the same for every seed
  # and method, evaluated each epoch beside the test split (metrics.csv: holdout_*; val_* is the test split).
  config.validation_examples = config_dict.placeholder(int)
  # r: each training and validation label (never a test label) is wrong with probability r, drawn from (seed, index).
  config.label_noise = 0.0
  config.label_noise_kind = "symmetric"  # symmetric (any other class) | pairflip (class c becomes c + 1)
  # k: evaluate the test split after every k-th epoch, the last, and each epoch with the best validation accuracy
  # so far (the others' val_* are NaN); the validation split is evaluated after every epoch.
  config.test_every_epochs = 1
  config.augment = config_dict.placeholder(str)  # None: the dataset's own; cifar | cutout | flip_cutout | none
  config.batch_size = 128  # global, over all devices and hosts
  config.eval_batch_size = 512
  config.data_on_device = False  # True: the train split lives on the devices; each step gathers its batch there
  config.max_in_memory_gb = 32.0  # splits larger than this (as stored) are streamed from disk
  config.cache_decoded = True  # save decoded TFDS splits, so later runs and resumes skip decoding
  config.decoded_cache_dir = config_dict.placeholder(str)  # None: <data_dir>/decoded

  # Model.
  # linear | small_cnn | mnist_cnn | mnist_cnn_head_norm | wrn16_4 | wrn28_10 | wrn28_10_authors | pyramidnet272
  # | pyramidnet272_bottleneck
  config.model = "small_cnn"
  config.dtype = "float32"  # computation dtype; parameters stay float32

  # Method.
  config.method = "aace_sam"  # sgd | sam | aace_sam | asam
  config.optimizer = config_dict.placeholder(str)  # deprecated: the old name of `method`, taken with a warning
  config.rho = config_dict.placeholder(float)  # None: 0.2 aace_sam, 0.05 sam, 0.5 asam
  config.normalize = config_dict.placeholder(bool)  # None: False for aace_sam, True for sam/asam
  config.max_perturbation_norm = config_dict.placeholder(float)  # None: unbounded (the paper); c: ||w_adv - w|| <= c
  config.sync_perturbation = True  # False: per-device perturbations (m-sharpness)
  config.perturb_every = 1  # k > 1: a new perturbation every k steps, one pass on the steps between
  config.reuse_perturbation = True  # between new perturbations: the kept one (True) or none (False: plain steps)
  config.perturbation_batch_fraction = 1.0  # f < 1: the first pass on the first f of each device's batch
  config.aace_mode = "ada"  # ada | const | rand
  config.aace_threshold = 0.0
  config.label_smoothing = 0.0

  # Base optimizer and schedule: SGD, lr x lr_decay at each fraction of training.
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.lr_decay = 0.2
  config.lr_milestones = (0.3, 0.6, 0.8)
  config.num_epochs = 30
  config.grad_accum_steps = 1  # micro-batches per step (same update, less memory)

  # Run.
  config.seed = 42
  config.log_every_steps = 10
  config.checkpoint_max_to_keep = 3
  config.halt_after_epochs = config_dict.placeholder(int)  # stop this invocation early, resumable
  # Warn after an epoch whose mean loss at w_adv is below this times the loss at w, or whose perturbation is
  # longer than this fraction of the weights' norm: signs of a breaking-down run (train.breakdown_warning).
  config.warn_loss_at_w_adv_ratio = 0.9  # None: never
  config.warn_perturbed_loss_ratio = config_dict.placeholder(float)  # deprecated: the old name of the above
  config.warn_relative_perturbation = 0.05  # None: never
  config.max_consecutive_skips = 10  # stop after this many steps in a row with non-finite gradients
  config.compilation_cache = True  # jax's persistent compilation cache: a resumed run loads its compiled steps
  config.compilation_cache_dir = config_dict.placeholder(str)  # None: ~/.cache/aace_jax/xla ($XDG_CACHE_HOME)
  config.overwrite = False  # True: discard a previous run in the workdir instead of resuming it
  return config
