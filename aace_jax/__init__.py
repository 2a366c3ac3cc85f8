"""AACE-SAM for JAX and Optax: adaptive adversarial cross-entropy for SAM."""

from aace_jax._losses import AACE_MODES
from aace_jax._losses import aace_cross_entropy
from aace_jax._losses import aace_targets
from aace_jax._losses import check_labels
from aace_jax._losses import cross_entropy
from aace_jax._sam import SAMState
from aace_jax._sam import aace_sam
from aace_jax._sam import sam

__version__ = "0.1.0"

__all__ = (
    "AACE_MODES",
    "SAMState",
    "aace_cross_entropy",
    "aace_sam",
    "aace_targets",
    "check_labels",
    "cross_entropy",
    "sam",
)
