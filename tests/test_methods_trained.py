"""ATP (ATP-TF and learned thresholds) and CoViPAL (a trained PPM): the method cards' test
oracles on planted contexts and tiny random models, weights plumbing and clear errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import vlmprune
from tests.contexts import make_context
from tests.tiny import batch, tiny_llava
from vlmprune.context import ModelInfo
from vlmprune.methods.atp import (
    ATP,
    ThresholdHeads,
    atp_points,
    cumulative_mass_keep,
    scale_masses,
    spatial_score,
)
from vlmprune.methods.covipal import PPM, CoViPAL, distill_loss, is_embedded, topk_overlap
from vlmprune.methods.feather import stride_grid_mask

INFO = ModelInfo("test", 256, (16, 16), True, 4, 2, 4, ("projector", "llm"))
POINTS = [1, 2, 3]  # ATP's default {2, 8, 16, 24} of 32 on a 4-layer LLM


@pytest.fixture(scope="module")
def model():
    return tiny_llava("clip", "sdpa")


def random_heads(seed: int = 0) -> ThresholdHeads:
    torch.manual_seed(seed)
    heads = ThresholdHeads(POINTS)
    for mlp in heads.mlps:
        torch.nn.init.normal_(mlp[2].weight, std=0.5)
    return heads.eval()


def atp_signals(cross: torch.Tensor, self_: torch.Tensor):
    """Signals of one llm-stage call: ``text_attention(query=...)`` gives the planted rows."""
    return {"text_attention": lambda layer, query="last", **kw: cross if query == "last" else self_}


def run_points(method: ATP, cross_fn, self_fn, budget: int, b: int = 1, n: int = 256):
    """Call ``select`` at every ATP point as the adapter would (survivors only); the planted
    signals are functions of the surviving raster indices. Returns the kept raster per point."""
    index = torch.arange(n).expand(b, -1)
    image_state = [{} for _ in range(b)]
    kept = []
    for k in POINTS:
        cur = index.shape[1]
        ctx = make_context(
            torch.zeros(b, cur, 4), budget=min(budget, cur), signals=atp_signals(cross_fn(index), self_fn(index)),
            info=INFO, stage="llm", layer=k, token_index=index, image_state=image_state,
        )
        sel = method.select(ctx)
        keep = sel.keep if isinstance(sel.keep, torch.Tensor) else torch.stack(sel.keep)
        index = index.gather(1, keep)
        kept.append(index)
    return kept


def flat(index):
    return torch.ones(index.shape, dtype=torch.float32) / index.shape[1]


# ---------------------------------------------------------------------------------------------- ATP-TF
def test_atp_points_scale_and_merge():
    assert atp_points((2, 8, 16, 24), (0.9, 0.8, 0.7, 0.6), (2, 4, 4, 4), 32, 4) == [(1, pytest.approx(0.72), 4), (2, 0.7, 4), (3, 0.6, 4)]
    assert [k for k, _, _ in atp_points((2, 8, 16, 24), (0.9, 0.8, 0.7, 0.6), (2, 4, 4, 4), 32, 32)] == [2, 8, 16, 24]
    with pytest.raises(ValueError, match="layers"):
        atp_points((2, 8), (0.9,), (4,), 32, 4)
    with pytest.raises(ValueError, match="mass"):
        ATP(mass=(0.9, 1.5, 0.7, 0.6))


def test_atp_mass_monotonic_and_scaled_masses():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 100, generator=gen) ** 4
    counts = [int(cumulative_mass_keep(scores, p).sum()) for p in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0)]
    assert counts == sorted(counts) and counts[-1] == 400
    prev = cumulative_mass_keep(scores, 0.2)
    for p in (0.4, 0.6, 0.8):  # nested sets
        cur = cumulative_mass_keep(scores, p)
        assert bool((cur | ~prev).all())
        prev = cur
    for ratio in (0.05, 0.125, 0.25, 0.5, 0.9):
        masses = scale_masses((0.72, 0.7, 0.6), ratio)
        assert math.prod(masses) == pytest.approx(ratio, rel=1e-6) and all(0 < m <= 1 for m in masses)
    assert scale_masses((0.72, 0.7, 0.6), 1.0) == [1.0, 1.0, 1.0]
    lows, highs = scale_masses((0.72, 0.7, 0.6), 0.1), scale_masses((0.72, 0.7, 0.6), 0.2)
    assert all(a <= b for a, b in zip(lows, highs))


def test_atp_tf_flat_attention_meets_budget_and_counts_fall():
    kept = run_points(ATP(sap_strides=(0, 0, 0, 0)), flat, flat, budget=64)
    counts = [k.shape[1] for k in kept]
    assert counts == sorted(counts, reverse=True)
    assert 64 <= counts[-1] <= 64 + 2  # flat attention is the calibration reference (each point rounds up)


def test_atp_tf_sap_grid_always_kept():
    gen = torch.Generator().manual_seed(1)
    peaky = torch.rand(256, generator=gen) ** 8
    kept = run_points(ATP(), lambda i: peaky[i], lambda i: peaky.flip(0)[i], budget=16, b=2)
    for k, (_, _, stride) in zip(kept, atp_points((2, 8, 16, 24), (0.9, 0.8, 0.7, 0.6), (2, 4, 4, 4), 32, 4)):
        grid = stride_grid_mask(torch.arange(256)[None], 16, stride)[0].nonzero().flatten()
        for row in k:
            assert set(grid.tolist()) <= set(row.tolist())


def test_atp_planted_winner_kept_at_every_stage():
    winner = 137  # not on the stride-4 grid
    def cross(index):
        return (index == winner).float()
    for budget in (8, 32, 128):
        for k in run_points(ATP(), cross, flat, budget=budget):
            assert winner in k[0].tolist()


def test_atp_peaky_attention_keeps_fewer_than_flat():
    gen = torch.Generator().manual_seed(2)
    peaky = torch.softmax(torch.randn(256, generator=gen) * 4, 0)
    n_flat = run_points(ATP(), flat, flat, budget=64)[-1].shape[1]
    n_peaky = run_points(ATP(), lambda i: peaky[i], lambda i: peaky[i], budget=64)[-1].shape[1]
    assert n_peaky < n_flat


def test_atp_end_to_end_monotonic_in_budget(model):
    inputs = batch([[10, 11, 12, 13]])  # one image: one select() call per point
    finals = []
    for budget in (8, 32, 64, 128, 256):
        with vlmprune.wrap(model, "atp", budget=budget) as h:
            with torch.no_grad():
                model(**inputs)
            pts = h.stats["points"]
        assert [p["point"] for p in pts] == ["llm:1", "llm:2", "llm:3"]
        for a, b in zip(pts, pts[1:]):
            assert all(x >= y for x, y in zip(a["out"], b["out"]))  # non-increasing across layers
        finals.append(pts[-1]["out"])
    assert finals[-1] == [256]
    # one insertion layer: the same scores at every budget, so the count cannot fall as it rises
    single = []
    for budget in (8, 32, 64, 128):
        with vlmprune.wrap(model, "atp", budget=budget, layers=(2,), layers_of=0, mass=(0.9,), sap_strides=(4,)) as h:
            with torch.no_grad():
                model(**inputs)
            single.append(h.stats["points"][0]["out"])
    assert all(all(x <= y for x, y in zip(a, b)) for a, b in zip(single, single[1:]))


# ---------------------------------------------------------------------------------------------- ATP learned
def test_atp_learned_thresholds_rule_and_minimum():
    heads = random_heads()
    method = ATP()
    method.load_weights(heads)
    assert method.variant == "learned"
    gen = torch.Generator().manual_seed(3)
    cross = torch.rand(1, 256, generator=gen)
    ctx = make_context(torch.zeros(1, 256, 4), budget=64, signals=atp_signals(cross, cross), info=INFO, stage="llm", layer=1)
    sel = method.select(ctx)
    keep = set(sel.keep[0].tolist())
    grid = stride_grid_mask(torch.arange(256)[None], 16, 4)[0].nonzero().flatten().tolist()
    assert set(grid) <= keep  # the coarse grid's spatial score is 1 > theta_s
    from vlmprune.methods.atp import head_features, minmax

    red = 0.5 * minmax(cross) + 0.5 * minmax(cross)
    theta = heads(0, head_features(cross, cross, 1.0, 0.25))
    above = set((red[0] > theta[0, 0]).nonzero().flatten().tolist())
    assert above <= keep
    extra = keep - above - set(grid)
    spatial = spatial_score(torch.arange(256)[None], 16, 4)[0]
    assert all(spatial[i] > theta[0, 1] for i in extra) or len(extra) <= 1


def test_atp_weights_round_trip_and_errors(model, tmp_path):
    heads = random_heads(1)
    path = tmp_path / "heads.safetensors"
    heads.save(path, extra={"note": "test"})
    loaded = ThresholdHeads.load(path)
    for a, b in zip(heads.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    inputs = batch([[10, 11, 12]])
    outs = []
    for w in (heads, str(path)):
        with vlmprune.wrap(model, "atp", budget=32, weights=w) as h:
            with torch.no_grad():
                outs.append(model(**inputs).logits)
            assert h.method.variant == "learned"
    torch.testing.assert_close(outs[0], outs[1])
    with pytest.raises(ValueError, match="weights"):
        vlmprune.wrap(model, "atp", budget=32, weights=str(tmp_path / "missing.safetensors"))
    wrong = ThresholdHeads((1, 2))
    with pytest.raises(ValueError, match="weights"):
        vlmprune.wrap(model, "atp", budget=32, weights=wrong)
    assert not hasattr(model, "_vlmprune_handle")


# ---------------------------------------------------------------------------------------------- CoViPAL
def covipal(ppm: PPM) -> CoViPAL:
    m = CoViPAL()
    m.load_weights(ppm)
    return m


def covipal_context(visual, text, budget, mask=None):
    mask = torch.ones(text.shape[:2], dtype=torch.bool) if mask is None else mask
    return make_context(visual, budget, {"projected": lambda: visual, "text_embedding": lambda: (text, mask)}, info=INFO)


def test_covipal_exact_count_order_and_determinism():
    gen = torch.Generator().manual_seed(4)
    visual, text = torch.randn(3, 256, 64, generator=gen), torch.randn(3, 7, 64, generator=gen)
    method = covipal(PPM(64, width=32, heads=2, seed=0))
    for r in (0.3, 0.125):
        k = round(r * 256)
        sel = method.select(covipal_context(visual, text, k))
        assert sel.keep.shape == (3, k)
        assert bool((sel.keep[:, 1:] > sel.keep[:, :-1]).all())  # raster order
        again = method.select(covipal_context(visual, text, k))
        assert torch.equal(sel.keep, again.keep)
        top = torch.sort(sel.scores.topk(k, -1).indices, -1).values
        assert torch.equal(sel.keep, top)


def test_covipal_text_dependence_and_padding():
    gen = torch.Generator().manual_seed(5)
    visual, text = torch.randn(1, 256, 64, generator=gen), torch.randn(1, 6, 64, generator=gen)
    method = covipal(PPM(64, width=32, heads=2, seed=0))
    a = method.select(covipal_context(visual, text, 32)).scores
    b = method.select(covipal_context(visual, torch.randn(1, 6, 64, generator=gen), 32)).scores
    assert not torch.allclose(a, b)
    padded = torch.cat([text, torch.randn(1, 3, 64, generator=gen)], 1)
    mask = torch.tensor([[True] * 6 + [False] * 3])
    c = method.select(covipal_context(visual, padded, 32, mask)).scores
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)  # padding is ignored


def test_covipal_teacher_agreement_on_planted_data():
    """The teacher's attention is a fixed function of a token feature (its normalised projection
    on one direction); a few hundred steps of stage-1 distillation recover its top-k (> 0.9
    overlap) on fresh data."""
    torch.manual_seed(0)
    dim, n, k = 32, 32, 8
    u = torch.randn(dim, generator=torch.Generator().manual_seed(1))
    u = (u - u.mean()) / (u - u.mean()).norm()
    ppm = PPM(dim, width=16, heads=2, ff=32, seed=0)
    ppm.train()
    opt = torch.optim.Adam(ppm.parameters(), lr=1e-2)

    def planted(b):
        v, t = torch.randn(b, n, dim), torch.randn(b, 4, dim)
        return v, t, torch.softmax(3.0 * (torch.nn.functional.layer_norm(v, (dim,)) @ u), -1)

    for _ in range(300):
        v, t, target = planted(16)
        loss = distill_loss(ppm(v, t), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ppm.eval()
    v, t, target = planted(64)
    with torch.no_grad():
        overlap = topk_overlap(ppm(v, t), target, k).mean()
    assert overlap > 0.9


def test_covipal_wrap_counts_and_errors(model, tmp_path):
    inputs = batch([[10, 11, 12], [20, 21]])
    ppm = PPM(64, seed=0)
    with vlmprune.wrap(model, "covipal", budget=0.25, weights=ppm) as h:
        with torch.no_grad():
            model(**inputs)
        assert h.stats["llm_visual_tokens"] == [64, 64]
    path = tmp_path / "ppm.safetensors"
    ppm.save(path, extra={"note": "test"})
    with vlmprune.wrap(model, "covipal", budget=16, weights=path) as h:
        with torch.no_grad():
            model(**inputs)
        assert h.stats["llm_visual_tokens"] == [16, 16]
    with pytest.raises(ValueError, match="weights"):  # another model, no shipped PPM
        vlmprune.wrap(model, "covipal", budget=16)
    with pytest.raises(ValueError, match="width"):
        with vlmprune.wrap(model, "covipal", budget=16, weights=PPM(32, seed=0)):
            with torch.no_grad():
                model(**inputs)
    with pytest.raises(TypeError, match="'weights'"):
        vlmprune.wrap(model, "fastv", budget=16, weights=path)
    with pytest.raises(TypeError, match="'weights'"):
        vlmprune.wrap(model, "covipal", budget=16, weights=42)
    assert not hasattr(model, "_vlmprune_handle")


def test_embedded_detection_by_checkpoint_path():
    from vlmprune.embedded import embedded_path

    assert is_embedded(SimpleNamespace(config=SimpleNamespace(_name_or_path=str(embedded_path()))))
    assert not is_embedded(SimpleNamespace(config=SimpleNamespace(_name_or_path="llava-hf/llava-1.5-7b-hf")))


def test_listed_with_metadata():
    listed = {m["name"]: m for m in vlmprune.methods()}
    assert listed["atp"]["stages"] == ["llm"] and listed["atp"]["accepts_weights"]
    assert listed["atp"]["paper"]["arxiv"] == "2412.00447"
    assert listed["covipal"]["stages"] == ["projector"] and not listed["covipal"]["training_free"]
    assert listed["covipal"]["paper"]["arxiv"] == "2508.17243"
    assert not listed["fastv"]["accepts_weights"]
