"""gcsam: Gradient-Centralized Sharpness-Aware Minimization for PyTorch."""

from .optim.batchnorm import frozen_bn_stats
from .optim.centralization import centralize_gradient
from .optim.modes import AdaptiveAscent, AscentFraction, LookSAM, MomentumAscent, Periodic
from .optim.sam import GCSAM, SAM, SharpnessAwareOptimizer
from .optim.schedules import LambdaRho, ProportionalRho

__all__ = [
    "GCSAM",
    "SAM",
    "AdaptiveAscent",
    "AscentFraction",
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
