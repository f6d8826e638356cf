"""Old module paths kept after the v2 rooms (issue 13): each warns once and stands for its new module."""

from __future__ import annotations

import importlib
import runpy
import sys
import warnings


def moved(name: str, old: str, new: str) -> None:
    """Called by the stub at ``old`` with its ``__name__``: imported, ``old`` becomes an alias of
    ``new``; run with ``python -m old``, it runs ``python -m new``."""
    warnings.warn(f"{old} moved to {new}; use {new}", DeprecationWarning, stacklevel=2)
    if name == "__main__":
        runpy.run_module(new, run_name="__main__", alter_sys=True)
    else:
        sys.modules[old] = importlib.import_module(new)
