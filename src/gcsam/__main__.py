"""``python -m gcsam`` is the ``gcsam`` command."""

import sys

from .cli import main

sys.exit(main())
