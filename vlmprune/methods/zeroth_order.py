"""Moved to :mod:`vlmprune.methods.zoo_prune` (file names equal registry keys); this path warns and aliases it."""

from vlmprune._moved import moved

moved(__name__, "vlmprune.methods.zeroth_order", "vlmprune.methods.zoo_prune")
