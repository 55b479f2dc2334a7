"""gcsam: Gradient-Centralized Sharpness-Aware Minimization for PyTorch."""

from .batchnorm import frozen_bn_stats
from .centralization import centralize_gradient
from .sam import GCSAM, SAM, SharpnessAwareOptimizer

__all__ = ["GCSAM", "SAM", "SharpnessAwareOptimizer", "centralize_gradient", "frozen_bn_stats"]
__version__ = "0.1.0"
