"""Moved to :mod:`vlmprune.tools.calibrate_adatoken3d`; this path warns and aliases it (``python -m`` runs the new module)."""

from vlmprune._moved import moved

moved(__name__, "vlmprune.calibrate_adatoken3d", "vlmprune.tools.calibrate_adatoken3d")
