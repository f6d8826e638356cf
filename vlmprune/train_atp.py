"""Moved to :mod:`vlmprune.tools.train_atp`; this path warns and aliases it (``python -m`` runs the new module)."""

from vlmprune._moved import moved

moved(__name__, "vlmprune.train_atp", "vlmprune.tools.train_atp")
