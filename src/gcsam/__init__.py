"""gcsam: Gradient-Centralized Sharpness-Aware Minimization for PyTorch."""

from .batchnorm import frozen_bn_stats
from .centralization import centralize_gradient
from .modes import AdaptiveAscent, LookSAM, MomentumAscent, Periodic
from .sam import GCSAM, SAM, SharpnessAwareOptimizer
from .schedules import LambdaRho, ProportionalRho

__all__ = [
    "GCSAM",
    "SAM",
    "AdaptiveAscent",
    "LambdaRho",
    "LookSAM",
    "MomentumAscent",
    "Periodic",
    "ProportionalRho",
    "SharpnessAwareOptimizer",
    "centralize_gradient",
    "frozen_bn_stats",
]
__version__ = "0.1.0"
