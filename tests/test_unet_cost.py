"""The UNet adapter's cost(): the transformer blocks' FLOPs of the last UNet call, checked against
the tiny UNet's blocks counted by hand (tests/cases_unet.py). CPU, no network."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import vlmprune
from tests.cases import UNET
from tests.cases_unet import unet_inputs


def by_hand(c: int, n: int, attn1: int, attn2: int, ff: int, text: int = 7, text_width: int = 32) -> int:
    """One row through a tiny-UNet transformer block of width ``c`` (one head group of width c,
    GEGLU MLP c -> 2 x 4c, 4c -> c) with ``n`` tokens, its branches on the given token counts."""
    self_attn = 4 * (2 * c * c * attn1) + 4 * attn1 * attn1 * c
    cross = 2 * (2 * c * c * attn2) + 2 * (2 * text_width * c * text) + 4 * attn2 * text * c
    mlp = 2 * ff * (c * 8 * c) + 2 * ff * (4 * c * c)
    return self_attn + cross + mlp


def flops(kept: int, branches: set[str]) -> int:
    """Two rows: the three 16 x 16 blocks (width 32) at ``kept`` tokens on ``branches``, the 8 x 8
    mid block (width 64) untouched."""
    top = by_hand(32, 256, *(kept if b in branches else 256 for b in ("attn1", "attn2", "ff")))
    return 2 * (3 * top + by_hand(64, 64, 64, 64, 64))


@pytest.mark.parametrize("options, branches", [({}, {"attn1"}), ({"merge_crossattn": True, "merge_mlp": True}, {"attn1", "attn2", "ff"})])
@pytest.mark.parametrize("method", ["tomesd", "optiprune"])
def test_cost_counts_the_reduced_branches(method, options, branches):
    unet = UNET.model()
    with vlmprune.wrap(unet, method, ratio=0.5, **options) as handle:
        assert "transformer_flops" not in handle.stats  # nothing before the first call
        with torch.no_grad():
            unet(**unet_inputs(2, 0))
        stats = handle.stats
    assert stats["transformer_flops_unpruned"] == flops(256, set())
    assert stats["transformer_flops"] == flops(128, branches)
    assert stats["flops_saved"] == flops(256, set()) - flops(128, branches)


def test_cost_of_a_ratio_of_zero_is_the_full_count():
    unet = UNET.model()
    with vlmprune.wrap(unet, "tomesd", ratio=0.0) as handle:
        with torch.no_grad():
            unet(**unet_inputs(3, 1))
        stats = handle.stats
    assert stats["transformer_flops"] == stats["transformer_flops_unpruned"] == 1.5 * flops(256, set())
    assert stats["flops_saved"] == 0
