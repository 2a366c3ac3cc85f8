"""AACE-SAM for JAX and Optax: adaptive adversarial cross-entropy for SAM."""

from aace_jax._losses import AACE_MODES
from aace_jax._losses import aace_cross_entropy
from aace_jax._losses import aace_kl_divergence
from aace_jax._losses import aace_targets
from aace_jax._losses import check_labels
from aace_jax._losses import cross_entropy
from aace_jax._nnx import nnx_apply_fn
from aace_jax._nnx import nnx_sharpness_aware_grads
from aace_jax._nnx import nnx_split
from aace_jax._parallel import fsdp_sharding
from aace_jax._parallel import pmap_step
from aace_jax._parallel import replicate
from aace_jax._parallel import replicate_on_mesh
from aace_jax._parallel import shard_step
from aace_jax._parallel import unreplicate
from aace_jax._sam import SAMState
from aace_jax._sam import aace_sam
from aace_jax._sam import named_weights
from aace_jax._sam import sam
from aace_jax._train_step import ApplyFn
from aace_jax._train_step import CompiledStep
from aace_jax._train_step import LogitsFn
from aace_jax._train_step import LossInputs
from aace_jax._train_step import Step
from aace_jax._train_step import TrainState
from aace_jax._train_step import classifier_logits_fn
from aace_jax._train_step import linen_apply_fn
from aace_jax._train_step import make_eval_step
from aace_jax._train_step import make_train_step

__version__ = "0.2.0.dev0"

__all__ = (
  "AACE_MODES",
  "ApplyFn",
  "CompiledStep",
  "LogitsFn",
  "LossInputs",
  "SAMState",
  "Step",
  "TrainState",
  "aace_cross_entropy",
  "aace_kl_divergence",
  "aace_sam",
  "aace_targets",
  "check_labels",
  "classifier_logits_fn",
  "cross_entropy",
  "fsdp_sharding",
  "linen_apply_fn",
  "make_eval_step",
  "make_train_step",
  "named_weights",
  "nnx_apply_fn",
  "nnx_sharpness_aware_grads",
  "nnx_split",
  "pmap_step",
  "replicate",
  "replicate_on_mesh",
  "sam",
  "shard_step",
  "unreplicate",
)
