"""Moved to :mod:`vlmprune.tools.calibrate_vflowopt`; this path warns and aliases it (``python -m`` runs the new module)."""

from vlmprune._moved import moved

moved(__name__, "vlmprune.calibrate_vflowopt", "vlmprune.tools.calibrate_vflowopt")
