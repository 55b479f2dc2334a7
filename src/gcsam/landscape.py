"""``gcsam.landscape`` is :mod:`gcsam.analysis.landscape`, loss landscapes.

Importing this name gives that module itself (it replaces this one in ``sys.modules``), so
both names share one module: its docstring, its attributes, whatever is patched in it.
"""

import sys

from .analysis import landscape

sys.modules[__name__] = landscape
