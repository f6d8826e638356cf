"""Moved to :mod:`vlmprune.embedded.harness`; this path warns and aliases it."""

from vlmprune._moved import moved

moved(__name__, "vlmprune.embedded_training", "vlmprune.embedded.harness")
