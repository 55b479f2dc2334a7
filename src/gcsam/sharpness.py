"""``gcsam.sharpness`` is :mod:`gcsam.analysis.sharpness`, Hessian spectra and SAM sharpness.

Importing this name gives that module itself (it replaces this one in ``sys.modules``), so
both names share one module: its docstring, its attributes, whatever is patched in it.
"""

import sys

from .analysis import sharpness

sys.modules[__name__] = sharpness
