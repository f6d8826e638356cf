"""Moved to :mod:`vlmprune.methods.random` (file names equal registry keys); this path warns and aliases it."""

from vlmprune._moved import moved

moved(__name__, "vlmprune.methods.random_prune", "vlmprune.methods.random")
