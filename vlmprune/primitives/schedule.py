"""Checks of the progressive schedules that several methods share (TransPrune, AdaToken-3D)."""

from __future__ import annotations

from itertools import pairwise


def check_ratios(method: str, ratios: tuple, layers: tuple) -> None:
    """Keep ratios of a progressive schedule (the fraction of the original tokens kept after
    each pruning layer): one per layer, each in (0, 1], non-increasing. A ValueError names
    option 'ratios' of ``method`` otherwise."""
    if len(ratios) != len(layers) or not ratios:
        raise ValueError(f"option 'ratios' of method {method!r} needs one ratio per pruning layer {tuple(layers)}, got {tuple(ratios)}")
    if any(not 0 < r <= 1 for r in ratios) or any(a < b for a, b in pairwise(ratios)):
        raise ValueError(f"option 'ratios' of method {method!r} must be non-increasing in (0, 1], got {tuple(ratios)}")
