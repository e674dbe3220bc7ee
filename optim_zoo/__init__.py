"""optim_zoo: published deep-learning optimizers for JAX, exact to their authors' code.

Each optimizer is an `optax.chain` of a primitive transform (exported here, composable on its
own) and building blocks. `docs/architecture.md` maps the modules.
"""

from optim_zoo._codes import CodedState
from optim_zoo._fusion import compiler_steering
from optim_zoo.adaptive_inertia import ScaleByAdaptiveInertiaState, scale_by_adaptive_inertia
from optim_zoo.alias import (
    adafactor,
    adai,
    adaiw,
    adan,
    apollo,
    came,
    factored_adai,
    factored_adan,
)
from optim_zoo.blocks import (
    ScaleByProximalLearningRateState,
    clip_by_block_rms,
    clip_by_global_norm,
    scale_by_param_rms,
    scale_by_proximal_learning_rate,
)
from optim_zoo.confidence import ScaleByConfidenceState, scale_by_confidence
from optim_zoo.diag_hessian import ScaleByRectifiedDiagHessianState, scale_by_rectified_diag_hessian
from optim_zoo.factored import ScaleByFactoredRmsState, scale_by_factored_rms
from optim_zoo.nesterov import ScaleByNesterovMomentState, scale_by_nesterov_moment
from optim_zoo.schedules import linear_warmup, relative_step_size
from optim_zoo.second_moment import FactoredSecondMoment, factored_dims, pytorch_last_two

__version__ = "0.1.0"

__all__ = [
    # Optimizers.
    "adafactor",
    "adai",
    "adaiw",
    "adan",
    "apollo",
    "came",
    # New combinations of the primitives, not from a paper.
    "factored_adai",
    "factored_adan",
    # Primitives and their states.
    "scale_by_adaptive_inertia",
    "scale_by_confidence",
    "scale_by_factored_rms",
    "scale_by_nesterov_moment",
    "scale_by_rectified_diag_hessian",
    "ScaleByAdaptiveInertiaState",
    "ScaleByConfidenceState",
    "ScaleByFactoredRmsState",
    "ScaleByNesterovMomentState",
    "ScaleByRectifiedDiagHessianState",
    "FactoredSecondMoment",
    "CodedState",
    # Building blocks the optimizers chain.
    "clip_by_block_rms",
    "clip_by_global_norm",
    "factored_dims",
    "pytorch_last_two",
    "linear_warmup",
    "relative_step_size",
    "scale_by_param_rms",
    "scale_by_proximal_learning_rate",
    "ScaleByProximalLearningRateState",
    # How the steps are compiled.
    "compiler_steering",
]
