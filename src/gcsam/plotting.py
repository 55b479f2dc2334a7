"""``gcsam.plotting`` is :mod:`gcsam.analysis.plotting`, their figures (matplotlib).

Importing this name gives that module itself (it replaces this one in ``sys.modules``), so
both names share one module: its docstring, its attributes, whatever is patched in it.
"""

import sys

from .analysis import plotting

sys.modules[__name__] = plotting
