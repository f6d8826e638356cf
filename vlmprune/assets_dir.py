"""Where the committed ``assets/`` folders are, in a source checkout or an installed package."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def assets_dir(name: str, marker: str) -> Path:
    """``assets/<name>`` of a source checkout / editable install, or ``vlmprune/assets/<name>``
    of a regular install: the first that holds ``marker``; the checkout's path if none does."""
    candidates = [Path(__file__).resolve().parents[1] / "assets" / name]
    spec = importlib.util.find_spec("vlmprune.assets")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / name for p in spec.submodule_search_locations]
    for c in candidates:
        if (c / marker).exists():
            return c
    return candidates[0]
