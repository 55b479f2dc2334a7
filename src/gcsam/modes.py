"""``gcsam.modes`` is :mod:`gcsam.optim.modes`, the cheap modes.

Importing this name gives that module itself (it replaces this one in ``sys.modules``), so
both names share one module: its docstring, its attributes, whatever is patched in it.
"""

import sys

from .optim import modes

sys.modules[__name__] = modes
