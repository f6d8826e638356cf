"""LLaVA family tests beyond the conformance kit (tests/test_conformance.py runs the truth
oracles on tests/cases.py's ``LLAVA`` cases): stats of a padded batch, and the sequence length
each decoder layer sees under an llm-stage method. Tiny random LLaVA (CLIP, SDPA), CPU."""

from __future__ import annotations

import pytest

import vlmprune
from tests.cases import LLAVA
from tests.tiny import batch, n_patches

TEXTS = LLAVA[0].texts
BUDGET = LLAVA[0].budget


def test_stats_batch_two_with_padding_budget_64_of_256():
    model = LLAVA[0].model()
    inputs = batch(TEXTS[:2], seed=5)
    assert n_patches() == 256
    with vlmprune.wrap(model, "divprune", budget=64) as handle:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        stats = handle.stats
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert stats["llm_visual_tokens"] == [64, 64]
    assert stats["points"] == [{"point": "projector", "in": [256, 256], "out": [64, 64]}]
    assert 0 < stats["llm_prefill_flops"] < stats["llm_prefill_flops_unpruned"]
    assert stats["kv_bytes_saved"] > 0
    # 192 of 256+7 positions removed per row: KV bytes scale with the sequence length
    full = inputs["input_ids"].shape[1]
    assert stats["kv_cache_bytes"] / stats["kv_cache_bytes_unpruned"] == pytest.approx((full - 192) / full)


def test_llm_stage_counts_and_full_sequence_before_k():
    """FastV: layers < K see every token, layers >= K see text + budget image tokens
    (measured on each decoder layer's output)."""
    model = LLAVA[0].model()
    inputs = batch(TEXTS[:2], seed=6)
    lengths = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, out, i=i: lengths.__setitem__(i, (out[0] if isinstance(out, tuple) else out).shape[1]))
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        with vlmprune.wrap(model, "fastv", budget=BUDGET, k_layer=2) as handle:
            LLAVA[0].forward(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    full = inputs["input_ids"].shape[1]
    assert lengths == {0: full, 1: full, 2: full - 256 + BUDGET, 3: full - 256 + BUDGET}
    assert handle.stats["points"] == [{"point": "llm:2", "in": [256, 256], "out": [BUDGET, BUDGET]}]
