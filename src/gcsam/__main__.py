"""``python -m gcsam`` is the ``gcsam`` command."""

import sys

from .toolkit import main

sys.exit(main())
