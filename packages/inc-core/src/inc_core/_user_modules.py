"""Modules a user asks the CLI to import before loading a model: custom Keras layers, custom pytree output
types, anything that registers itself with a framework on import.

A model file names such classes but cannot carry their code; the module that defines them registers them when
imported. ``inc ... --import-module MODULE`` imports them (the current directory first on ``sys.path``, as
``python -m`` would), and passes the list to benchmark instances, which load the model in processes of their own.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from inc_core.errors import ConfigError

__all__ = ["ENV", "import_user_modules"]

#: the modules, comma-separated, for the processes of a multi-instance benchmark
ENV = "INC_IMPORT_MODULES"


def import_user_modules(names: Sequence[str] | None = None) -> None:
    """Import ``names`` (default: the ones in ``$INC_IMPORT_MODULES``) with the current directory importable.

    Raises:
        ConfigError: a module that cannot be imported, with the reason.
    """
    if names is None:
        names = [n for n in os.environ.get(ENV, "").split(",") if n]
    if not names:
        return
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an ImportError, or whatever the module raises while it runs
            raise ConfigError(
                f"--import-module {name}: {type(exc).__name__}: {exc}. Give a module importable from the current directory "
                "or PYTHONPATH (a dotted name such as mypackage.layers, not a file path)."
            ) from exc
