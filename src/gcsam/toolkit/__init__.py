"""The experiment toolkit behind the ``gcsam`` command (the ``[toolkit]`` extra).

It builds on the optimizer library (:mod:`gcsam`) and never the other way round. Imports go one
way: ``cli`` -> ``study`` -> ``compare``/``trainer``/``measure`` -> ``rundir``/``config``/
registries (``optimizers``, ``models``, ``data``) -> the library.
"""

from __future__ import annotations

from collections.abc import Sequence

# What the ``[toolkit]`` extra installs, as Python imports it.
_EXTRA_MODULES = ("numpy", "sklearn", "scipy", "PIL", "matplotlib", "tqdm", "yaml")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``gcsam`` command (:mod:`gcsam.toolkit.cli`); when a dependency of the toolkit is
    missing, it says which extra to install instead of a traceback."""
    import sys

    try:
        from .cli import main as cli_main

        return cli_main(argv)
    except ModuleNotFoundError as error:
        if error.name not in _EXTRA_MODULES:
            raise
        print(
            f"gcsam: the experiment toolkit needs {error.name}: pip install 'gcsam[toolkit]'",
            file=sys.stderr,
        )
        return 2
