"""Moved to :mod:`vlmprune.tools.train_covipal`; this path warns and aliases it (``python -m`` runs the new module)."""

from vlmprune._moved import moved

moved(__name__, "vlmprune.train_covipal", "vlmprune.tools.train_covipal")
