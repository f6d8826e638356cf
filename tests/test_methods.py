"""Planted-example oracles for the reference baselines (the cards' test oracles), on
hand-made contexts, plus determinism and exact counts through wrap()."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import vlmprune
from vlmprune.budget import Budget
from vlmprune.context import ModelInfo
from vlmprune.methods.prumerge_plus import iqr_outlier_ratio
from tests.contexts import make_context
from tests.tiny import batch, tiny_llava

INFO = ModelInfo("test", 64, (8, 8), True, 4, 2, 4, ("encoder", "projector", "llm"))


def context(tokens, budget, stage="projector", layer=None, seed=0, **signals):
    constants = {k: (lambda v=v, **kw: v) for k, v in signals.items()}
    return make_context(tokens, budget, constants, INFO, stage, layer, seed=seed)


def test_fastv_keeps_the_planted_token_and_exact_count():
    scores = torch.rand(2, 64) * 0.01
    scores[0, 37] = 1.0
    scores[1, 5] = 1.0
    sel = vlmprune.get_method("fastv")().select(context(torch.randn(2, 64, 8), 10, "llm", 2, text_attention=scores))
    assert sel.keep.shape == (2, 10)
    assert 37 in sel.keep[0].tolist() and 5 in sel.keep[1].tolist()
    assert torch.equal(sel.keep, torch.sort(sel.keep).values)


def test_random_is_deterministic_under_a_seed():
    method = vlmprune.get_method("random")
    tokens = torch.randn(2, 64, 8)
    a = method(seed=3).select(context(tokens, 12, seed=3)).keep
    b = method(seed=3).select(context(tokens, 12, seed=3)).keep
    c = method(seed=4).select(context(tokens, 12, seed=4)).keep
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (2, 12)


def test_uniform_keeps_the_lattice():
    sel = vlmprune.get_method("uniform")().select(context(torch.randn(1, 64, 8), 16))
    assert sel.keep[0].tolist() == [r * 8 + c for r in (1, 3, 5, 7) for c in (1, 3, 5, 7)]  # cell centres


def _qkv_with_cls_attention(cls_row: torch.Tensor, heads=2, d=4):
    """q/k/v whose CLS query attends to the tokens in proportion to exp(cls_row)."""
    b, t = cls_row.shape
    q = torch.zeros(b, heads, t, d)
    k = torch.zeros(b, heads, t, d)
    q[:, :, 0, 0] = 1.0
    k[:, :, :, 0] = cls_row[:, None, :] * d**0.5
    return q, k, torch.randn(b, heads, t, d)


def test_visionzip_dominant_contextual_split_and_planted_winner():
    method = vlmprune.get_method("visionzip")()
    assert method.split(64) == (53, 10) and method.split(128) == (107, 20) and method.split(192) == (161, 30)
    tokens = torch.randn(1, 64, 8)
    cls_attention = torch.rand(1, 64) * 0.01
    cls_attention[0, 50] = 1.0
    qkv = _qkv_with_cls_attention(torch.cat([torch.zeros(1, 1), torch.randn(1, 64)], 1))
    sel = method.select(context(tokens, 16, cls_attention=cls_attention, encoder_qkv=qkv))
    n_dom, n_ctx = method.split(16)
    assert sel.keep_cls and sel.keep.shape == (1, n_dom + n_ctx) and n_dom + n_ctx + 1 == 16
    assert 50 in sel.keep[0, :n_dom].tolist()
    torch.testing.assert_close(sel.merged[0, :n_dom], tokens[0, sel.keep[0, :n_dom]])  # dominant unchanged
    # merge_map: every token lands in a kept slot; kept tokens in their own; a contextual value is
    # its target plus the mean of the other tokens mapped to it
    mm = sel.merge_map[0]
    assert bool((mm >= 0).all()) and mm[sel.keep[0]].tolist() == list(range(n_dom + n_ctx))
    j = n_dom
    joined = [i for i in range(64) if int(mm[i]) == j and i != int(sel.keep[0, j])]
    torch.testing.assert_close(sel.merged[0, j], tokens[0, sel.keep[0, j]] + tokens[0, joined].mean(0))


@pytest.mark.parametrize("offset", ["0", "step/6"])
def test_prumerge_plus_adaptive_count_spatial_samples_and_summary(offset):
    n = 64
    row = torch.zeros(1, n + 1)
    row[0, 1 + torch.tensor([3, 40])] = 6.0  # two planted outliers in CLS attention
    q, k, v = _qkv_with_cls_attention(row, heads=1, d=8)
    tokens = torch.randn(1, n, 8)
    method = vlmprune.get_method("prumerge_plus")(sample_offset=offset)
    sel = method.select(context(tokens, n, encoder_qkv=(q, k, v)))
    cls_attn = sel.scores[0]
    ratio = iqr_outlier_ratio(cls_attn)
    assert ratio == Fraction(2, 64)
    # step int(1/ratio) = 32: samples every int(32/3) = 10 from 0 (current code) or from
    # int(32/6) = 5 (April 2024 code)
    start = 0 if offset == "0" else 5
    samples = [i for i in range(start, n - 1, 10) if i not in (3, 40)]
    assert sorted(sel.keep[0].tolist()[:2]) == [3, 40]  # the outliers first, in rank order
    assert sel.keep[0].tolist()[2:] == samples
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[sel.keep[0]] = False
    torch.testing.assert_close(sel.extra[0][0], (tokens[0][dropped] * cls_attn[dropped, None]).sum(0))
    mm = sel.merge_map[0]
    assert mm[sel.keep[0]].tolist() == list(range(len(sel.keep[0])))
    absorbed = dropped & (mm >= 0)
    assert 0 < int(absorbed.sum()) < int(dropped.sum()) + 1 and bool((mm[~dropped] >= 0).all())


@pytest.mark.parametrize("outliers, spacing", [(11, 17), (32, 6)])
def test_prumerge_plus_counts_are_those_of_exact_arithmetic(outliers, spacing):
    # 576 CLS scores (LLaVA-1.5) with planted outliers over a uniform floor (no outliers of its
    # own): the official float64 counts are int(576 * m/576) = m top tokens and samples every
    # int(int(576/m) / 3): 11 outliers -> 11 and 17, 32 -> 32 and 6 (a float32 ratio gave 10 and 5)
    n = 576
    gen = torch.Generator().manual_seed(outliers)
    row = torch.cat([torch.zeros(1, 1), torch.rand(1, n, generator=gen) * 0.1], 1)
    planted = torch.randperm(n, generator=gen)[:outliers]
    row[0, 1 + planted] = 8.0
    q, k, v = _qkv_with_cls_attention(row, heads=1, d=8)
    sel = vlmprune.get_method("prumerge_plus")().select(context(torch.randn(1, n, 8), n, encoder_qkv=(q, k, v)))
    keep = sel.keep[0].tolist()
    top = set(planted.tolist())
    assert int(n * (outliers / n)) == outliers and int(int(1 / (outliers / n)) / 3) == spacing  # float64 reference
    assert set(keep[:outliers]) == top
    assert keep[outliers:] == [i for i in range(0, n - 1, spacing) if i not in top]


@pytest.mark.parametrize("name", ["random", "uniform", "divprune", "visionzip", "fastv"])
def test_exact_counts_and_determinism_through_wrap(name):
    model = tiny_llava("clip", "sdpa")
    inputs = batch([[10, 11], [12, 13, 14]], seed=7)
    outs = []
    for _ in range(2):
        with vlmprune.wrap(model, name, budget=40) as handle:
            outs.append(model.generate(**inputs, max_new_tokens=3, do_sample=False))
        assert handle.stats["llm_visual_tokens"] in ([40, 40], [256, 256])  # fastv: 40 after layer K
        assert handle.stats["points"][-1]["out"] == [40, 40]
    assert torch.equal(outs[0], outs[1])


#: how each method's official code turns a ratio into a count: int() (floor) or round()
FRACTION_ROUNDING = {
    "prumerge_plus": "floor",  # int(N * reduction_ratio)
    "feather": "floor",  # int(len * fastv_ratio)
    "holov": "floor",  # Qwen port: int(image_token_len * prune_rate)
    "hiprune": "round",  # Qwen code: round(n_image_tokens * RETAIN)
    "vflowopt": "round",  # round(N * (1 - illava_vit_r)) removed
    "flowcut": "round",  # token counts only (target_num)
    "todre": "round",  # no official code
}


@pytest.mark.parametrize("name", sorted(FRACTION_ROUNDING))
def test_fraction_budgets_round_as_each_official_code(name):
    rounding = vlmprune.get_method(name).fraction_rounding
    assert rounding == FRACTION_ROUNDING[name]
    # 60 tokens x 0.112 = 6.72: int() gives 6, round() 7 (the HoloV Qwen port's case)
    assert Budget.parse(0.112, rounding=rounding).resolve_target(60) == (6 if rounding == "floor" else 7)


def test_holov_fraction_budget_floors_through_wrap():
    model = tiny_llava("clip", "sdpa")
    with vlmprune.wrap(model, "holov", budget=0.3, overflow="redistribute") as handle:
        with torch.no_grad():
            model(**batch([[10, 11], [12, 13, 14]], seed=7))
    assert handle.stats["points"][0]["out"] == [76, 76]  # int(256 * 0.3); round() gave 77
