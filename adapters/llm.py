"""Moved to :mod:`vlmprune.adapters.decoder` (named for what it holds); this path warns and aliases it."""

from vlmprune._moved import moved

moved(__name__, "vlmprune.adapters.llm", "vlmprune.adapters.decoder")
