"""The method registry: each method file registers itself by name on import."""

from __future__ import annotations

import fnmatch
from typing import Any

from .method import SIGNALS, Method

_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method under ``cls.name``; a duplicate name is an error."""
    if not cls.name or cls.name != cls.name.lower():
        raise ValueError(f"method name must be a non-empty lowercase string, got {cls.name!r}")
    if cls.name in _METHODS:
        raise KeyError(f"a method named {cls.name!r} is already registered ({_METHODS[cls.name].__module__})")
    unknown = set(cls.needs) - SIGNALS
    if unknown:
        raise ValueError(f"method {cls.name!r} needs unknown signals {sorted(unknown)}; known: {sorted(SIGNALS)}")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; valid choices: {sorted(_METHODS)}")
    return _METHODS[name]


def methods(filter: str = "*", stage: str | None = None) -> list[dict[str, Any]]:
    """Registered methods with their metadata, sorted by name.

    ``filter`` is an fnmatch pattern on the name; ``stage`` keeps methods acting there.
    """
    out = []
    for name in sorted(_METHODS):
        cls = _METHODS[name]
        if not fnmatch.fnmatch(name, filter) or (stage is not None and stage not in cls.stages):
            continue
        out.append(
            {
                "name": name,
                "stages": list(cls.stages),
                "roles": list(cls.roles),
                "needs": sorted(cls.needs),
                "training_free": cls.training_free,
                "requires_cls": cls.requires_cls,
                "accepts_weights": cls.accepts_weights,
                "uses_budget": cls.uses_budget,
                "positions": cls.positions if isinstance(cls.positions, str) else "per instance",
                "llm_positions": cls.llm_positions,
                "paper": dict(cls.paper),
                "options": cls.options(),
            }
        )
    return out
