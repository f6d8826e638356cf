"""Moved to :mod:`vlmprune.tools.bench`; this path warns and aliases it (``python -m`` runs the new module)."""

from vlmprune._moved import moved

moved(__name__, "vlmprune.bench", "vlmprune.tools.bench")
