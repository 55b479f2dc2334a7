"""``gcsam.schedules`` is :mod:`gcsam.optim.schedules`, the rho schedules.

Importing this name gives that module itself (it replaces this one in ``sys.modules``), so
both names share one module: its docstring, its attributes, whatever is patched in it.
"""

import sys

from .optim import schedules

sys.modules[__name__] = schedules
