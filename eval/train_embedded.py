"""Moved to :mod:`vlmprune.embedded.training` (``vlmprune train-embedded``); this path warns and
aliases it (``python -m`` runs the new module)."""

from vlmprune._moved import moved

moved(__name__, "vlmprune.eval.train_embedded", "vlmprune.embedded.training")
