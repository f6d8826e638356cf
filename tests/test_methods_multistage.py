"""Planted-example oracles (the cards' "test oracle" sections) for VFlowOpt, ToDRE and ZOO-Prune,
their primitives, and exact per-point counts, determinism and the VFlowOpt calibration command
through wrap() on tiny random models."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import vlmprune
from tests.contexts import make_context
from tests.tiny import batch, n_patches, tiny_llava
from tests.truth import positions_from_mask, record_selections
from vlmprune.tools import calibrate_vflowopt
from vlmprune.context import ModelInfo
from vlmprune.method import scale_llm_layers
from vlmprune.methods.vflowopt import RELEASED, layer_average, solve_ratios
from vlmprune.methods.zoo_prune import minmax_normalise
from vlmprune.primitives.merging import recycle_by_cell
from vlmprune.primitives.scoring import (
    context_relevance,
    histogram_entropy,
    perturbation_sensitivity,
)
from vlmprune.primitives.selection import (
    greedy_k_center,
    greedy_max_sum,
    pairwise_distance,
    weighted_max_min,
)

SMALL = ModelInfo("test", 16, (4, 4), False, 4, 2, 4, ("encoder", "projector", "llm"))
TEXTS = [[10, 11, 12], [20, 21]]
_MODELS: dict = {}


def model_for(tower="clip"):
    if tower not in _MODELS:
        _MODELS[tower] = tiny_llava(tower, "sdpa")
    return _MODELS[tower]


def context(tokens, budget, signals, info=SMALL, stage="projector", layer=None, token_index=None, image_state=None, target=None):
    return make_context(tokens, budget, signals, info, stage, layer, token_index, image_state=image_state, target=target)


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, position_ids=positions_from_mask(inputs["attention_mask"])).logits


def counts(stats):
    return [(p["point"], p["out"]) for p in stats["points"]]


# ================================================================================ layer mapping
def test_llm_layer_mapping_rule_and_errors():
    assert scale_llm_layers((9, 18), 28, 28, "x") == (9, 18)
    assert scale_llm_layers((9, 18), 28, 32, "x") == (10, 21)
    assert scale_llm_layers((9, 18), 28, 4, "x") == (1, 3)
    assert scale_llm_layers((16,), 32, 4, "x") == (2,)
    assert scale_llm_layers((2, 3), 0, 4, "x") == (2, 3)
    with pytest.raises(ValueError, match="option 'llm_layers'.*strictly increasing"):
        scale_llm_layers((9, 18), 28, 2, "option 'llm_layers'")


# ================================================================================ VFlowOpt
def planted_attention(n, g, j_star, heads=2):
    """Every row attends almost only to ``g`` (so the global set is {g}); row ``g`` is one-hot on ``j_star``."""
    a = torch.full((n, n), 1e-4)
    a[:, g] = 1.0
    a[g] = 0.0
    a[g, j_star] = 1.0
    a = a / a.sum(-1, keepdim=True)
    return a[None, None].expand(1, heads, n, n).clone()


def test_vflowopt_context_relevance_planted_global_token():
    probs = planted_attention(16, g=3, j_star=11)
    rel = context_relevance(probs, t=2.0)
    assert int(rel.argmax()) == 11
    # an impossible threshold: the most attended token is the global set (no NaN)
    torch.testing.assert_close(context_relevance(probs, t=1e9), rel)
    method = vlmprune.get_method("vflowopt")(recycle=False, r_v=1 / 16)
    x = torch.randn(1, 16, 8)
    sel = method.select(context(x, 2, {"encoder_attention": lambda layer=None: probs}, target=2))
    assert sel.keep.tolist() == [[11]]


def test_vflowopt_recycling_conservation_and_count():
    n, cols, cell = 16, 4, 2.0
    x = torch.randn(n, 3)
    importance = torch.rand(n) + 0.1
    pruned = torch.zeros(n, dtype=torch.bool)
    pruned[[0, 1, 4, 5, 10, 15]] = True  # cell (0, 0): 0, 1, 4, 5; cell (1, 1): 10, 15
    x[[0, 1, 4, 5]] = torch.tensor([1.0, 2.0, 3.0])  # one cell whose pruned tokens share a feature
    keep, values, owner = recycle_by_cell(x, importance, pruned, torch.arange(n), cols, cell)
    cells = {(int(i) // cols // 2, int(i) % cols // 2) for i in pruned.nonzero().flatten()}
    assert keep.numel() == n - int(pruned.sum()) + len(cells)
    assert torch.all(keep[1:] > keep[:-1])
    carrier = int(torch.tensor([0, 1, 4, 5])[importance[[0, 1, 4, 5]].argmax()])
    assert carrier in keep.tolist()
    torch.testing.assert_close(values[keep.tolist().index(carrier)], torch.tensor([1.0, 2.0, 3.0]))
    w = importance[[10, 15]] / importance[[10, 15]].sum()
    carrier = [10, 15][int(importance[[10, 15]].argmax())]
    torch.testing.assert_close(values[keep.tolist().index(carrier)], w @ x[[10, 15]])
    untouched = [i for i in keep.tolist() if not pruned[i]]
    assert torch.equal(values[[keep.tolist().index(i) for i in untouched]], x[untouched])
    # owner: each token's carrier, as a position in keep (the cell's carrier for pruned tokens)
    assert keep[owner].tolist()[10] == keep[owner].tolist()[15] == carrier
    assert all(keep[owner[i]] == i for i in keep.tolist())


def test_vflowopt_select_counts_follow_the_card():
    info = ModelInfo("test", 64, (8, 8), False, 4, 2, 4, ("encoder", "projector", "llm"))
    probs = torch.rand(2, 2, 64, 64).softmax(-1)
    method = vlmprune.get_method("vflowopt")(r_v=0.3, m=9.0)  # cell side 9 * 8 / 27 tokens
    projected = torch.randn(2, 64, 16)  # LLM space: the code recycles projected features
    ctx = context(torch.randn(2, 64, 8), 12, {"encoder_attention": lambda layer=None: probs, "projected": lambda: projected}, info=info)
    sel = method.select(ctx)
    imp = sel.scores
    n_red, cell = round(64 * 0.7), 9.0 * 8 / 27
    n_low = n_red + int(64 / cell**2)
    assert sel.merged_space == "projected"
    for j in range(2):
        low = torch.sort(imp[j], stable=True).indices[:n_low]
        cells = {(math.floor(int(i) // 8 / cell), math.floor(int(i) % 8 / cell)) for i in low}
        assert sel.keep[j].numel() == 64 - n_low + len(cells)
        assert torch.all(sel.keep[j][1:] > sel.keep[j][:-1])
        for p in range(sel.keep[j].numel()):  # every kept row: the importance-weighted mean of what merged into it
            members = (sel.merge_map[j] == p).nonzero().flatten()
            w = imp[j, members] / imp[j, members].sum()
            torch.testing.assert_close(sel.merged[j][p], (w[:, None] * projected[j, members]).sum(0))
    # LLM stage: the same importance map, round(M (1 - r)) lowest dropped
    hp = method.hyper(12 / 64, info)
    layer = method.layers(info)[1]
    alive = sel.keep[0][None]
    llm = context(torch.randn(1, alive.shape[1], 8), 12, {}, info=info, stage="llm", layer=layer, token_index=alive, image_state=ctx.image_state[:1])
    out = method.select(llm)
    m = alive.shape[1]
    expect = torch.sort(torch.sort(imp[0][alive[0]], descending=True, stable=True).indices[: m - round(m * (1 - hp["r_2"]))]).values
    assert torch.equal(out.keep[0], expect)


def test_vflowopt_budget_algebra():
    cfg = RELEASED[0.10]
    r_v, r_1, r_2 = solve_ratios(0.10, (9, 18), 28, cfg["r_v"], cfg["r_1"], cfg)
    assert abs(r_2 - cfg["r_2"]) < 1e-3
    assert layer_average(r_v, r_1, r_2, (9, 18), 28) == pytest.approx(0.10)
    for budget, cfg in RELEASED.items():  # with r_v derived, the released r_v come back
        r_v, _, _ = solve_ratios(budget, (9, 18), 28, 0.0, 0.0, cfg)
        assert abs(r_v - cfg["r_v"]) < 2e-3
    assert solve_ratios(1.0, (9, 18), 28, 0.0, 0.0, RELEASED[0.50]) == (1.0, 1.0, 1.0)


def test_vflowopt_entropy_sanity():
    assert float(histogram_entropy(torch.full((196,), 7))) == 0.0
    assert float(histogram_entropy(torch.arange(196))) == pytest.approx(math.log2(196))
    method = vlmprune.get_method("vflowopt")()
    levels = (torch.arange(196, dtype=torch.float64) + 0.5) / 255  # 8-bit levels 0..195
    patches = torch.stack([levels.view(14, 14).expand(3, 14, 14), torch.full((3, 14, 14), 0.2)])[None]
    ent = method.pixel_entropy(patches)
    torch.testing.assert_close(ent, torch.tensor([[math.log2(196), 0.0]]))


def test_vflowopt_entropy_multiplies_by_255_in_the_pixels_float32():
    # float32(257/255) * 255 is 257 in float32 (level 1 after the uint8 wrap) and 256.99.. in
    # float64 (level 0): a patch of half such pixels and half zeros has 1 bit in the official
    # float32 arithmetic and 0 bits in float64 (CLIP-normalised pixels reach 2.15)
    method = vlmprune.get_method("vflowopt")()
    v = torch.tensor(257 / 255, dtype=torch.float32)
    assert int((v * 255).to(torch.uint8)) == 1 and int((v.double() * 255).trunc()) % 256 == 0
    patch = torch.zeros(3, 14, 14)
    patch[:, :7] = v
    ent = method.pixel_entropy(patch[None, None])
    torch.testing.assert_close(ent, torch.tensor([[1.0]]))


def test_vflowopt_through_wrap_counts_identity_and_llm_lengths():
    model = model_for()
    inputs = batch(TEXTS, seed=3)
    n = n_patches()
    ref = forward(model, inputs)
    with vlmprune.wrap(model, "vflowopt", budget=n, recycle=False) as h:  # keep all: identity
        torch.testing.assert_close(forward(model, inputs), ref, atol=1e-5, rtol=0)
    r_v, r_1 = 0.15, 0.7  # r_2 from the budget: 24 / 256 tokens on average over layers 0 | 1-2 | 3
    r_2 = (24 / n * 4 - 1 * r_v - 2 * r_v * r_1) / (1 * r_v * r_1)
    c0 = n - round(n * (1 - r_v))
    c1 = c0 - round(c0 * (1 - r_1))
    c2 = c1 - round(c1 * (1 - r_2))
    assert (c0, c1, c2) == (38, 27, 4)
    lengths = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, out, i=i: lengths.__setitem__(i, (out[0] if isinstance(out, tuple) else out).shape[1]))
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        with vlmprune.wrap(model, "vflowopt", budget=24, recycle=False, r_v=r_v, r_1=r_1) as h:
            first = forward(model, inputs)
            again = forward(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert counts(h.stats) == [("projector", [c0, c0]), ("llm:1", [c1, c1]), ("llm:3", [c2, c2])]
    text = inputs["input_ids"].shape[1] - n  # BOS + text (+ padding) of the longest row
    assert lengths == {0: text + c0, 1: text + c1, 2: text + c1, 3: text + c2}
    assert torch.equal(first, again)


def test_vflowopt_batch_with_per_image_recycling_counts():
    """Recycling leaves different counts per image; the LLM stages then run per count group,
    and every row still equals its image run alone."""
    model = model_for()
    texts = [[10, 11, 12, 13, 14], [20, 21], [30, 31, 32]]
    inputs = batch(texts, seed=3)
    with vlmprune.wrap(model, "vflowopt", budget=0.5) as h:
        batched = forward(model, inputs)[:, -1]
        stats = h.stats
        assert len(set(stats["points"][0]["out"])) > 1  # the case under test
        assert [p["point"] for p in stats["points"]].count("llm:1") == 2
        for i in range(3):
            single = batch([texts[i]], seed=3)
            single["pixel_values"] = inputs["pixel_values"][i : i + 1]
            torch.testing.assert_close(forward(model, single)[0, -1], batched[i], atol=1e-4, rtol=1e-4)


def test_vflowopt_config_file(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"method": "vflowopt", "options": {"t": 3.5, "m": 6.0, "r_v": 0.2}, "calibration": {}}))
    method = vlmprune.get_method("vflowopt")(config=str(path))
    assert (method.t, method.m, method.r_v) == (3.5, 6.0, 0.2)
    with pytest.raises(ValueError, match="given both"):
        vlmprune.get_method("vflowopt")(config=str(path), t=1.0)
    path.write_text(json.dumps({"options": {"threshold": 3.5}}))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['threshold'\]"):
        vlmprune.wrap(model_for(), "vflowopt", budget=24, config=str(path))
    path.write_text(json.dumps({"options": {}, "extra": 1}))
    with pytest.raises(ValueError, match="unknown top-level keys"):
        vlmprune.get_method("vflowopt")(config=str(path))
    path.write_text(json.dumps({"options": {"t": "high"}}))
    with pytest.raises(TypeError, match="option 't'"):
        vlmprune.get_method("vflowopt")(config=str(path))


def test_vflowopt_schedule_refused():
    with vlmprune.wrap(model_for(), "vflowopt", budget={"projector": 64, "llm": 24}):
        with pytest.raises(ValueError, match="per-point schedule"):
            forward(model_for(), batch(TEXTS[:1]))


def test_calibration_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "cfg.json"
    args = ["--model", "tiny", "--trials", "3", "--samples", "2", "--budget", "0.25"]
    assert calibrate_vflowopt.main(args + ["--out", str(out)]) == 0
    cfg = json.loads(out.read_text())
    cal = cfg["calibration"]
    assert set(cfg["options"]) == {"r_v", "r_1", "t", "m", "alpha_v"}
    assert cal["trials"] == 3 and len(cal["history"]) == 3 and cal["objective"] >= cal["objective_default"]
    assert cal["objective"] == max(h["objective"] for h in cal["history"])
    for key, (lo, hi) in cal["space"].items():  # random trials stay in the box
        assert all(lo <= h["options"][key] <= hi for h in cal["history"][1:])
    again = tmp_path / "again.json"
    calibrate_vflowopt.main(args + ["--out", str(again)])
    assert json.loads(again.read_text()) == cfg  # seeded
    model, n = model_for(), n_patches()
    r_v = cfg["options"]["r_v"]
    with vlmprune.wrap(model, "vflowopt", budget=0.25, config=str(out), recycle=False) as h:
        forward(model, batch(TEXTS, seed=1))
    assert h.method.r_v == r_v
    assert h.stats["points"][0]["out"] == [n - round(n * (1 - r_v))] * 2


# ================================================================================ ToDRE
def test_todre_k_center_two_approximation():
    gen = torch.Generator().manual_seed(1)
    subsets = torch.tensor(list(itertools.combinations(range(10), 3)))  # [120, 3]
    for _ in range(5):
        x = torch.randn(1, 10, 2, generator=gen)
        dist = pairwise_distance(x, "euclidean")[0]
        radius = dist[:, subsets].min(dim=-1).values.max(dim=0).values  # covering radius of every subset
        greedy = greedy_k_center(x, 3, metric="euclidean", first=torch.tensor([0]))[0]
        assert float(dist[:, greedy].min(dim=-1).values.max()) <= 2 * float(radius.min()) + 1e-6


def clusters(k=4, size=5, dim=8):
    """``k`` clusters of identical tokens along orthogonal axes (cosine distance 1 between clusters)."""
    x = torch.zeros(k * size, dim)
    for c in range(k):
        x[c * size : (c + 1) * size, c] = 1.0 + c
    perm = torch.randperm(k * size, generator=torch.Generator().manual_seed(0))
    return x[perm][None], (perm // size)


@pytest.mark.parametrize("diversity", ["kcenter", "maxsum"])
def test_todre_planted_clusters_one_per_cluster(diversity):
    x, label = clusters()
    method = vlmprune.get_method("todre")(diversity=diversity)
    sel = method.select(context(x, 4, {"projected": lambda: x}, info=ModelInfo("test", 20, (4, 5), False, 4, 2, 4, ("projector", "llm"))))
    assert sorted(label[sel.keep[0]].tolist()) == [0, 1, 2, 3]
    assert torch.all(sel.keep[0][1:] > sel.keep[0][:-1])


@pytest.mark.parametrize("rule", [greedy_k_center, greedy_max_sum])
def test_todre_duplicates_never_both_selected(rule):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 12, 6, generator=gen)
    x[0, 7] = x[0, 3]
    for first in range(12):
        keep = rule(x, 5, first=torch.tensor([first]))[0].tolist()
        assert not {3, 7} <= set(keep)
        assert len(keep) == 5 == len(set(keep)) and keep == sorted(keep)


def test_todre_stage2_relevance_planted_and_drop_all():
    x = torch.randn(1, 10, 8)
    scores = torch.zeros(1, 10)
    scores[0, [2, 6, 9]] = torch.tensor([0.5, 0.3, 0.2])
    signals = {"text_attention": lambda layer, query: scores}
    method = vlmprune.get_method("todre")(stage2="relevance", stage2_keep=0.3)
    sel = method.select(context(x, 10, signals, stage="llm", layer=2))
    assert sel.keep.tolist() == [[2, 6, 9]]
    sel = method.select(context(x, 2, signals, stage="llm", layer=2, target=10))  # a scheduled llm budget wins
    assert sel.keep.tolist() == [[2, 6]]
    sel = vlmprune.get_method("todre")().select(context(x, 10, {}, stage="llm", layer=2))  # default: drop_all
    assert sel.keep.shape == (1, 0)


def test_todre_through_wrap_counts_lengths_and_determinism():
    model = model_for()
    inputs = batch(TEXTS, seed=4)
    full = inputs["input_ids"].shape[1]
    old = {"diversity": "kcenter", "seed_token": "far_from_mean", "stage2": "relevance", "stage2_layer": 16}  # earlier defaults
    with vlmprune.wrap(model, "todre", budget=24, **old) as h:
        with record_selections(h) as seen:
            first = forward(model, inputs)
        second = forward(model, inputs)
    assert counts(h.stats) == [("projector", [24, 24]), ("llm:2", [12, 12])]
    assert torch.equal(first, second)
    assert [len(k) for k in seen[0][2].keep] == [24, 24]
    lengths = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, out, i=i: lengths.__setitem__(i, (out[0] if isinstance(out, tuple) else out).shape[1]))
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        with vlmprune.wrap(model, "todre", budget=24) as h:  # default: every visual token dropped before 7L/8 = 3 of 4
            forward(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert counts(h.stats) == [("projector", [24, 24]), ("llm:3", [0, 0])]
    assert lengths == {0: full - 256 + 24, 1: full - 256 + 24, 2: full - 256 + 24, 3: full - 256}  # prefix + text
    with vlmprune.wrap(model, "todre", budget=24, stage2="none") as h:
        forward(model, inputs)
    assert counts(h.stats) == [("projector", [24, 24])]


def test_todre_defaults_follow_the_v2_reading():
    """v2 defaults on a planted example: the first token is the CLS-attention argmax of the last
    ViT layer (a different argmax planted at the feature layer), then greedy max-sum (which picks
    differently from k-center here); stage 2 drops every visual token before layer 7L/8."""
    info = ModelInfo("test", 20, (4, 5), True, 6, 4, 32, ("projector", "llm"))  # 6 ViT layers: last = 5
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 20, 6, generator=gen)
    asked = []

    def cls_attention(layer=None, reduce="mean"):
        asked.append(layer)
        a = torch.full((1, 20), 0.01)
        a[0, 13 if layer == 5 else 2] = 1.0
        return a

    method = vlmprune.get_method("todre")()
    assert method.seed_rule(info) == "cls_attention" and method.check(info) is None and "cls_attention" in method.needs
    assert method.capture_layers(info) == {"encoder": (5,), "llm": ()}
    sel = method.select(context(x, 7, {"projected": lambda: x, "cls_attention": cls_attention}, info=info))
    assert asked == [5]
    want = greedy_max_sum(x, 7, first=torch.tensor([13]))
    assert torch.equal(sel.keep, want) and not torch.equal(want, greedy_k_center(x, 7, first=torch.tensor([13])))
    assert method.select(context(x, 1, {"projected": lambda: x, "cls_attention": cls_attention}, info=info)).keep.tolist() == [[13]]
    for depth, k2 in ((32, 28), (40, 35), (4, 3)):
        layers = ModelInfo("test", 20, (4, 5), True, 6, 4, depth, ("projector", "llm"))
        assert method.points(layers) == [vlmprune.Point("projector"), vlmprune.Point("llm", k2)]
    assert vlmprune.get_method("todre")().seed_rule(ModelInfo("test", 20, (4, 5), False, 6, 4, 32, ())) == "far_from_mean"


def test_todre_cls_seed_needs_cls():
    with pytest.raises(ValueError, match="seed_token='cls_attention'.*CLS"):
        vlmprune.wrap(model_for("siglip"), "todre", budget=24, seed_token="cls_attention")
    with vlmprune.wrap(model_for(), "todre", budget=24, seed_token="cls_attention") as h:
        forward(model_for(), batch(TEXTS[:1]))
    assert h.stats["points"][0]["out"] == [24]


# ================================================================================ ZOO-Prune
def test_zoo_linear_projector_is_divprune_from_token_zero():
    torch.manual_seed(0)
    proj = torch.nn.Linear(6, 5).double()
    feats = torch.randn(1, 12, 6, dtype=torch.float64)
    method = vlmprune.get_method("zoo_prune")(m=8)
    u = method.directions(6, torch.Generator().manual_seed(3)).double()
    s = method.sensitivity(feats, proj, u)
    torch.testing.assert_close(s[0], (u @ proj.weight.T).norm(dim=-1).mean().expand(12), rtol=1e-9, atol=1e-9)
    assert torch.equal(minmax_normalise(s), torch.ones_like(s))
    signals = {"projector": lambda: proj, "projector_input": lambda: feats, "projected": lambda: proj(feats)}
    sel = method.select(context(feats, 5, signals, info=ModelInfo("test", 12, (3, 4), False, 4, 2, 4, ("projector",))))
    assert torch.equal(sel.keep, greedy_k_center(proj(feats), 5, first=torch.tensor([0])))


def test_zoo_finite_differences_match_autograd():
    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 3)).double()
    x = torch.randn(1, 7, 4, dtype=torch.float64)
    u = torch.nn.functional.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1)
    s = perturbation_sensitivity(mlp, x, u, h=1e-4, chunk=2)
    exact = torch.stack(
        [torch.stack([torch.autograd.functional.jvp(mlp, x[0, i], u[j])[1].norm() for j in range(5)]).mean() for i in range(7)]
    )
    torch.testing.assert_close(s[0].double(), exact, rtol=1e-6, atol=1e-6)


def test_zoo_greedy_invariants():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 15, 6, generator=gen)
    x[0, 9] = x[0, 4]
    w = torch.rand(1, 15, generator=gen) + 0.1
    order = weighted_max_min(x, 6, w, keep_order=False)[0].tolist()
    assert order[0] == int(w.argmax())
    assert len(set(order)) == 6 and not {4, 9} <= set(order)
    assert weighted_max_min(x, 6, w)[0].tolist() == sorted(order)


def test_zoo_through_wrap_counts_and_seed():
    model = model_for()
    inputs = batch(TEXTS, seed=6)
    picks = []
    for seed in (0, 0, 1):
        with vlmprune.wrap(model, "zoo_prune", budget=24, seed=seed, m=16) as h:
            with record_selections(h) as seen:
                forward(model, inputs)
        assert counts(h.stats) == [("projector", [24, 24])]
        picks.append(seen[0][2].keep)
    assert torch.equal(picks[0], picks[1])
    with vlmprune.wrap(model, "zoo_prune", budget=24, m=16, precision="fp32") as h:
        with record_selections(h) as seen:
            forward(model, inputs)
    assert torch.equal(seen[0][2].keep, picks[0])  # an fp32 model: both precisions agree
