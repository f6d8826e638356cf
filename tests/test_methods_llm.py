"""Planted-example oracles (the cards' "test oracle" sections) for the LLM-stage methods FEATHER,
TransPrune and AdaToken-3D, their primitives and signals checked against hand computations with
the model's own modules, exact per-point counts through wrap() on tiny LLaVA and Qwen-VL models,
and AdaToken-3D's calibration command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vlmprune
from tests.contexts import make_context
from tests.tiny import IMAGE_TOKEN, batch, n_patches, qwen_batch, tiny_llava, tiny_qwen
from tests.truth import Replay, greedy_no_cache, manual_multistage, positions_from_mask, record_selections
from vlmprune.tools import calibrate_adatoken3d as cal
from vlmprune.adapters.decoder import SublayerIO
from vlmprune.budget import Budget, progressive_count
from vlmprune.context import ModelInfo
from vlmprune.method import scale_llm_layers
from vlmprune.methods.feather import Feather, stride_grid_mask
from vlmprune.primitives.scoring import transition_variation

TEXTS = [[10, 11, 12, 13, 14], [20, 21]]
_MODELS: dict = {}


def model_for(kind="clip"):
    if kind not in _MODELS:
        _MODELS[kind] = tiny_qwen("2.5") if kind == "qwen" else tiny_llava(kind, "sdpa")
    return _MODELS[kind]


def forward(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, position_ids=positions_from_mask(inputs["attention_mask"]), **kw)


def llm_info(grid=(6, 6), layers=4):
    return ModelInfo("test", grid[0] * grid[1], grid, False, 4, 2, layers, ("llm",))


def head_probs(scores: torch.Tensor, heads: int = 2) -> torch.Tensor:
    """Per-head attention rows ``[B, H, N]`` whose head mean ranks like ``scores``."""
    return scores.softmax(-1)[:, None].expand(-1, heads, -1).clone()


def decoder_lengths(model, run):
    """Sequence length each decoder layer outputs during ``run()`` (the last forward)."""
    lengths, hooks = {}, []
    for i, layer in enumerate(model.model.language_model.layers):
        hooks.append(layer.register_forward_hook(lambda m, a, out, i=i: lengths.__setitem__(i, (out[0] if isinstance(out, tuple) else out).shape[1])))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return lengths


# ================================================================================ shared pieces
def test_layer_spreading_and_progressive_counts():
    assert scale_llm_layers((7, 9, 12), 32, 32, "x", spread=True) == (7, 9, 12)
    assert scale_llm_layers((7, 9, 12), 32, 4, "x", spread=True) == (1, 2, 3)
    assert scale_llm_layers((7, 9, 12), 32, 8, "x", spread=True) == (2, 3, 4)
    assert scale_llm_layers((8, 16, 24), 32, 4, "x") == (1, 2, 3)
    with pytest.raises(ValueError, match="strictly increasing"):
        scale_llm_layers((7, 9, 12), 32, 3, "x", spread=True)
    ratios = (0.875, 0.625, 0.125)  # TransPrune's official schedule on LLaVA-1.5's 576 tokens
    assert [progressive_count(ratios, t, 72, 576) for t in range(3)] == [504, 360, 72]
    assert [progressive_count(ratios, t, 576, 576) for t in range(3)] == [576, 576, 576]
    assert [progressive_count((0.5, 0.25, 0.125), t, 32, 256) for t in range(3)] == [128, 64, 32]


def test_transition_variation_scale_invariance_and_direction():
    x = torch.randn(2, 9, 16)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False  # padding
    w = transition_variation(x, 2.5 * x, valid)
    torch.testing.assert_close(w[0], torch.full((9,), 2.5 / 9))  # d = 0 everywhere: uniform softmax
    torch.testing.assert_close(w[1, 3:], torch.full((6,), 2.5 / 6))
    assert torch.all(w[1, :3] == 0)
    flipped = -x  # cos = -1: the code's 1 - cos = 2, the paper's 1 - |cos| = 0
    torch.testing.assert_close(transition_variation(x, flipped, direction="abs"), transition_variation(x, x))
    with pytest.raises(ValueError, match="direction"):
        transition_variation(x, x, direction="bad")


# ================================================================================ FEATHER
def test_feather_stride_grid_exact_set():
    idx = torch.arange(36)[None]
    assert stride_grid_mask(idx, 6, 3)[0].nonzero().flatten().tolist() == [0, 3, 18, 21]
    assert not stride_grid_mask(torch.tensor([[-1]]), 6, 1).any()  # a CLS slot (raster -1)


def test_feather_coverage_counts_planted_winner_and_rope_free_criterion():
    info = llm_info((6, 6))
    method = vlmprune.get_method("feather")()
    assert method.points(info) == [vlmprune.Point("llm", 1), vlmprune.Point("llm", 2)]
    scores = torch.rand(2, 36)
    scores[:, 20] = 5.0  # the planted winner (not on the grid)
    asked = []

    def signal(**kw):
        asked.append(kw)
        return head_probs(scores)

    state = [{}, {}]
    n, k1 = 36, 10  # kappa = 10 / 36
    first = method.select(make_context(torch.randn(2, n, 8), k1, {"text_attention": signal}, info, "llm", 1, image_state=state))
    assert asked[0]["rope"] is False and asked[0]["layer"] == 0 and asked[0]["query"] == "last"
    for keep in first.per_image():
        kept = keep[0].tolist()
        assert {0, 3, 18, 21} <= set(kept) and 20 in kept
        assert kept == sorted(set(kept))
        assert k1 <= len(kept) <= k1 + 4  # int(kappa M) <= |kept| <= int(kappa M) + ceil(G/s)^2
    # stage 2 over the survivors of image 0: exactly int(M1 * (r * r)) with the official
    # r = 1 - fastv_ratio, grid not protected, winner kept
    m1 = first.per_image()[0][0].numel()
    alive = first.per_image()[0][0][None]
    second = method.select(
        make_context(torch.randn(1, m1, 8), k1, {"text_attention": lambda **kw: head_probs(scores[:1, alive[0]])}, info, "llm", 2, token_index=alive, image_state=state[:1])
    )
    assert second.keep.shape == (1, int(m1 * ((1 - 0.7) * (1 - 0.7))))
    assert int(alive[0, second.keep[0, 0]]) == 20

    def stage2(options, m, k, n=36):
        state = [{}]
        m_ = vlmprune.get_method("feather")(**options)
        m_.select(make_context(torch.randn(1, n, 8), k, {"text_attention": lambda **kw: head_probs(torch.rand(1, n))}, info, "llm", 1, image_state=state))
        return m_.select(make_context(torch.randn(1, m, 8), k, {"text_attention": lambda **kw: head_probs(torch.rand(1, m))}, info, "llm", 2, token_index=torch.arange(m)[None], image_state=state)).keep.shape[1]

    assert stage2({"stage2_of": "original"}, 20, 18) == int(36 * (0.3 * 0.3))  # of the original N
    assert stage2({"stage2_of": "original", "ratio": 0}, 20, 18) == int((18 / 36) ** 2 * 36)  # kappa from the budget
    assert stage2({"ratio": 0}, 20, 18) == int((18 / 36) ** 2 * 20)
    fastv = vlmprune.get_method("feather")(criterion="rope")
    fastv.select(make_context(torch.randn(2, n, 8), k1, {"text_attention": signal}, info, "llm", 1))
    assert asked[-1]["rope"] is True


def test_feather_stage_counts_follow_the_official_ratio():
    # the code: stage 1 int(len * r), stage 2 int(len * (r * r)), r = 1 - fastv_ratio = 1 - 0.7
    r = 1 - 0.7
    assert Budget.parse(0.3, rounding=Feather.fraction_rounding).resolve_target(256) == int(256 * r) == 76  # round: 77
    info = llm_info((27, 27))
    state = [{}]
    method = vlmprune.get_method("feather")()
    method.select(make_context(torch.randn(1, 729, 8), int(729 * r), {"text_attention": lambda **kw: head_probs(torch.rand(1, 729))}, info, "llm", 1, image_state=state))
    m1 = 223  # survivors: int(223 * 0.09) = 20, where kappa = 218 / 729 from the budget gave 19
    second = method.select(
        make_context(torch.randn(1, m1, 8), 218, {"text_attention": lambda **kw: head_probs(torch.rand(1, m1))}, info, "llm", 2, token_index=torch.arange(m1)[None], image_state=state)
    )
    assert second.keep.shape[1] == int(m1 * (r * r)) == 20 and int((218 / 729) ** 2 * m1) == 19
    with pytest.raises(ValueError, match="option 'ratio' of method 'feather'"):
        vlmprune.get_method("feather")(ratio=1.0)


def test_feather_signal_is_the_rope_free_softmax_over_image_keys():
    """Stage-1 scores equal a hand computation from layer 0's own q/k without RoPE: softmax of
    the last token's logits over the image keys only, mean over heads."""
    model = model_for()
    inputs = batch(TEXTS, seed=7)
    lm = model.model.language_model
    with vlmprune.wrap(model, "feather", budget=0.3) as handle, record_selections(handle) as seen:
        forward(model, inputs)
    emb = forward(model, inputs, output_hidden_states=True).hidden_states[0]
    layer = lm.layers[0]
    x = layer.input_layernorm(emb)
    q = layer.self_attn.q_proj(x).view(2, -1, 4, 16).transpose(1, 2)
    k = layer.self_attn.k_proj(x).view(2, -1, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    for i in range(2):
        img = (inputs["input_ids"][i] == IMAGE_TOKEN).nonzero().flatten()
        logits = (q[i, :, -1:] @ k[i, :, img].transpose(-1, -2))[:, 0] / 4.0
        torch.testing.assert_close(seen[0][2].scores[i], logits.softmax(-1).mean(0), atol=1e-5, rtol=1e-5)


def test_feather_through_wrap_ragged_counts_manual_and_cache_equivalence():
    """Stage-1 counts differ per image (top-k overlaps the grid differently): exact counts per
    point, layers before the first point see the full sequence, logits equal the unwrapped LLM
    run with those tokens dropped by hand, and the cache gives the no-cache tokens."""
    model = model_for()
    inputs = batch(TEXTS, seed=1)
    full = inputs["input_ids"].shape[1]
    out = {}
    with vlmprune.wrap(model, "feather", budget=0.3) as handle, record_selections(handle) as seen:
        lengths = decoder_lengths(model, lambda: out.setdefault("logits", forward(model, inputs).logits))
    pruned = out["logits"]
    k1, grid = int(256 * (1 - 0.7)), 36  # the code's int(len * r): 76 of 256; 16 x 16 grid, stride 3: 6 x 6
    first = handle.stats["points"][0]
    assert first["point"] == "llm:1" and first["in"] == [256, 256]
    kept = first["out"]
    assert kept[0] != kept[1]  # this seed's images overlap the grid differently: rows are ragged
    assert all(k1 <= c <= k1 + grid for c in kept)
    later = [p for p in handle.stats["points"][1:]]
    assert [p["in"][0] for p in later] == kept
    assert [p["out"][0] for p in later] == [int(c * ((1 - 0.7) * (1 - 0.7))) for c in kept]
    assert lengths[0] == full  # layer 0 (before the first point) sees every token
    assert lengths[3] == full - 256 + max(p["out"][0] for p in later)
    with torch.no_grad():
        refs = manual_multistage(model, inputs, seen, None)
    for i, ref in enumerate(refs):
        torch.testing.assert_close(pruned[i, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-5)
    with vlmprune.wrap(model, "feather", budget=0.3) as handle, record_selections(handle) as seen:
        cached = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    with vlmprune.wrap(model, Replay(seen, "original"), budget=0.3):
        assert torch.equal(greedy_no_cache(model, inputs, 4), cached[:, inputs["input_ids"].shape[1] :])


def test_feather_schedule_sets_stage_two_and_keep_all_is_identity():
    model = model_for("siglip")
    inputs = batch(TEXTS, seed=2)
    with vlmprune.wrap(model, "feather", budget={"llm:1": 40, "llm:2": 12}, stride=0) as handle:
        forward(model, inputs)
    assert [(p["point"], p["out"]) for p in handle.stats["points"]] == [("llm:1", [40, 40]), ("llm:2", [12, 12])]
    ref = forward(model, inputs).logits
    with vlmprune.wrap(model, "feather", budget=1.0):
        torch.testing.assert_close(forward(model, inputs).logits, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="option 'layers' of method 'feather'"):
        vlmprune.wrap(model, "feather", budget=8, layers=(3, 3), layers_of=0)


# ================================================================================ TransPrune
def sublayer(x_in, x_out, visual):
    b, length = x_in.shape[:2]
    return SublayerIO(x_in, x_out, x_in, x_in, torch.ones(b, length, dtype=torch.bool), visual)


def test_transprune_ttv_scale_invariance_and_planted_rotation():
    info = llm_info((4, 4))
    method = vlmprune.get_method("transprune")(layers=(1, 2, 3), layers_of=0, band=(0,))
    visual = torch.arange(2, 18)[None]  # 16 image tokens after a 2-token prefix, 3 text tokens after
    x = torch.randn(1, 21, 8)
    uniform = lambda **kw: torch.full((1, 16), 1 / 16)  # noqa: E731
    ctx = make_context(torch.randn(1, 16, 8), 8, {"sublayer_io": lambda layer: sublayer(x, 3.0 * x, visual), "text_attention": uniform}, info, "llm", 1)
    torch.testing.assert_close(method.ttv(ctx), torch.full((1, 16), 1 / 16))  # d = 0: exactly uniform
    j = 5
    out = x.clone()
    rot = torch.zeros(8, 8)
    rot[0, 1], rot[1, 0] = -1.0, 1.0
    rot[2:, 2:] = torch.eye(6)
    x[0, 2 + j, 2:] = 0  # a vector in the rotated plane: the rotation turns it by 90 degrees
    out[0, 2 + j] = 3 * (rot @ x[0, 2 + j])
    signals = {"sublayer_io": lambda layer: sublayer(x, out, visual), "text_attention": uniform}
    ttv = method.ttv(make_context(torch.randn(1, 16, 8), 1, signals, info, "llm", 1))
    assert int(ttv.argmax()) == j
    for budget in (1, 4):
        sel = method.select(make_context(torch.randn(1, 16, 8), budget, signals, info, "llm", 3))
        assert j in sel.keep[0].tolist() and sel.keep.shape == (1, budget)
    # IGA: with no transition signal the instruction attention decides; the query is the text after the image
    asked = []
    iga = torch.rand(1, 16) * 0.1
    iga[0, 11] = 1.0

    def text_attention(**kw):
        asked.append(kw)
        return iga

    signals = {"sublayer_io": lambda layer: sublayer(x, 3.0 * x, visual), "text_attention": text_attention}
    sel = method.select(make_context(torch.randn(1, 16, 8), 1, signals, info, "llm", 3))
    assert sel.keep.tolist() == [[11]] and asked[0] == {"layer": 3, "query": "instruction"}


def _sublayer_recorder(model, layers):
    """Our own hooks on the sub-layers of ``layers`` (hand reference for ``sublayer_io``)."""
    seen, hooks = {}, []
    for idx in layers:
        for part, module in (("attn", model.model.language_model.layers[idx].self_attn), ("mlp", model.model.language_model.layers[idx].mlp)):

            def hook(m, args, kwargs, out, idx=idx, part=part):
                x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                seen[(idx, part)] = (x, out[0] if isinstance(out, tuple) else out)

            hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    return seen, hooks


def test_transprune_through_wrap_counts_and_ttv_against_hand_computation():
    """alpha = 1 (TTV only): the scores at the second point equal the transitions of layers 0
    and 1 recomputed by hand from the sub-layers' own inputs/outputs, for the survivors of the
    first point, in a padded batch; exact counts; lengths; keep-all identity."""
    model = model_for()
    inputs = batch(TEXTS, seed=3)
    full = inputs["input_ids"].shape[1]
    seen_io, hooks = _sublayer_recorder(model, (0, 1))
    try:
        with vlmprune.wrap(model, "transprune", budget=0.125, alpha=1.0) as handle, record_selections(handle) as seen:
            lengths = decoder_lengths(model, lambda: forward(model, inputs))
    finally:
        for h in hooks:
            h.remove()
    counts = [(p["point"], p["out"]) for p in handle.stats["points"]]
    assert counts == [("llm:1", [224, 224]), ("llm:2", [160, 160]), ("llm:3", [32, 32])]  # 256 x (0.875, 0.625, 0.125)
    assert lengths == {0: full, 1: full - 32, 2: full - 96, 3: full - 224}
    first, second = seen[0], seen[1]
    mask = inputs["attention_mask"].bool()
    image = inputs["input_ids"] == IMAGE_TOKEN
    for i in range(2):
        img0 = image[i].nonzero().flatten()
        kept_img = img0[first[2].keep[i]]  # survivors of point 1, positions in layer 0's sequence
        keep_pos = torch.sort(torch.cat([(~image[i]).nonzero().flatten(), kept_img])).values
        img1 = torch.searchsorted(keep_pos, kept_img)  # their positions in layer 1's sequence
        total = torch.zeros(kept_img.numel())
        for layer, (valid, positions) in ((0, (mask[i], kept_img)), (1, (mask[i][keep_pos], img1))):
            for part in ("attn", "mlp"):
                x_in, x_out = seen_io[(layer, part)]
                total += transition_variation(x_in[i : i + 1], x_out[i : i + 1], valid[None])[0, positions]
        torch.testing.assert_close(second[2].scores[i], total / total.sum(), atol=1e-6, rtol=1e-5)
    ref = forward(model, inputs).logits
    with vlmprune.wrap(model, "transprune", budget=n_patches()):
        torch.testing.assert_close(forward(model, inputs).logits, ref, atol=1e-5, rtol=0)


# ================================================================================ AdaToken-3D
def test_adatoken3d_planted_winner_counts_and_next_layer_query():
    info = llm_info((8, 8))
    method = vlmprune.get_method("adatoken3d")()
    assert method.points(info) == [vlmprune.Point("llm", k) for k in (1, 2, 3)]
    asked = []
    scores = torch.rand(1, 64) * 0.01
    scores[0, 42] = 1.0

    def signal(**kw):
        asked.append(kw)
        return scores[:, : ctx_n[0]]

    ctx_n = [64]
    for stage, (layer, n) in enumerate(zip((1, 2, 3), (64, 32, 16))):
        ctx_n[0] = n
        tokens = torch.randn(1, n, 8)
        scores[0, :n] = torch.rand(n) * 0.01
        scores[0, min(42, n - 1)] = 1.0
        sel = method.select(make_context(tokens, 8, {"text_attention": signal}, info, "llm", layer))
        assert sel.keep.shape == (1, int(64 * (0.5, 0.25, 0.125)[stage] * 8 / 8))
        assert min(42, n - 1) in sel.keep[0].tolist()
        assert asked[-1] == {"layer": layer, "query": "last"}


def test_adatoken3d_next_layer_attention_against_hand_computation_and_lengths():
    """The scores at the first point are the last prompt token's attention in layer 1 (the next
    layer), recomputed by hand from layer 1's own norm, q/k and RoPE on its input."""
    model = model_for()
    inputs = batch(TEXTS, seed=4)
    full = inputs["input_ids"].shape[1]
    lm = model.model.language_model
    out1 = {}
    hook = lm.layers[1].register_forward_hook(lambda m, a, out: out1.setdefault("h", out[0] if isinstance(out, tuple) else out))
    try:
        with vlmprune.wrap(model, "adatoken3d", budget=32) as handle, record_selections(handle) as seen:
            lengths = decoder_lengths(model, lambda: forward(model, inputs))
    finally:
        hook.remove()
    assert [(p["point"], p["out"]) for p in handle.stats["points"]] == [("llm:1", [128, 128]), ("llm:2", [64, 64]), ("llm:3", [32, 32])]
    assert lengths == {0: full, 1: full - 128, 2: full - 192, 3: full - 224}
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def last_token_attention(layer, hidden, pos, real, img):
        cos, sin = lm.rotary_emb(hidden, position_ids=pos)
        x = lm.layers[layer].input_layernorm(hidden)
        q = lm.layers[layer].self_attn.q_proj(x).view(1, -1, 4, 16).transpose(1, 2)
        k = lm.layers[layer].self_attn.k_proj(x).view(1, -1, 2, 16).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        logits = (q[0, :, -1:] @ k[0].repeat_interleave(2, dim=0).transpose(-1, -2))[:, 0] / 4.0
        return logits.masked_fill(~real, float("-inf")).softmax(-1).mean(0)[img]

    hidden0 = forward(model, inputs, output_hidden_states=True).hidden_states[1]  # unpruned input of layer 1
    pos = positions_from_mask(inputs["attention_mask"])
    image = inputs["input_ids"] == IMAGE_TOKEN
    for i in range(2):
        real = inputs["attention_mask"][i].bool()
        img = image[i].nonzero().flatten()
        torch.testing.assert_close(seen[0][2].scores[i], last_token_attention(1, hidden0[i : i + 1], pos[i : i + 1], real, img), atol=1e-5, rtol=1e-5)
        # point 2: layer 2 on layer 1's output (after point 1), kept tokens renumbered without gaps
        # (the official code's compact positions): minus the tokens removed before each
        keep_pos = torch.sort(torch.cat([(~image[i]).nonzero().flatten(), img[seen[0][2].keep[i]]])).values
        now = torch.searchsorted(keep_pos, img[seen[0][2].keep[i]])
        compact = pos[i : i + 1, keep_pos] - (keep_pos - torch.arange(keep_pos.numel()))
        assert int(compact[0, -1]) == int(pos[i, -1]) - 128
        expect = last_token_attention(2, out1["h"][i : i + 1], compact, real[keep_pos], now)
        torch.testing.assert_close(seen[1][2].scores[i], expect, atol=1e-5, rtol=1e-5)


def test_llm_methods_on_qwen_keep_all_batch_equals_single_and_own_grids():
    model = model_for("qwen")
    texts, grids = [[10, 11, 12, 13], [20, 21]], [(16, 16), (12, 16)]  # 64 and 48 merged tokens
    inputs = qwen_batch(texts, grids, seed=5)
    with torch.no_grad():
        ref = model(**inputs).logits
    for name in ("feather", "transprune", "adatoken3d"):
        with vlmprune.wrap(model, name, budget=1.0):
            with torch.no_grad():
                torch.testing.assert_close(model(**inputs).logits, ref, atol=1e-5, rtol=0)
        budget = 0.3 if name == "feather" else 0.125
        with vlmprune.wrap(model, name, budget=budget) as handle, record_selections(handle) as seen:
            with torch.no_grad():
                batched = model(**inputs).logits[:, -1]
                for i in range(2):
                    single = qwen_batch([texts[i]], [grids[i]], seed=5)
                    start = sum(h * w for h, w in grids[:i])
                    single["pixel_values"] = inputs["pixel_values"][start : start + grids[i][0] * grids[i][1]]
                    torch.testing.assert_close(model(**single).logits[0, -1], batched[i], atol=1e-4, rtol=1e-4)
        if name == "feather":  # each image's own merged grid (8 x 8 and 6 x 8) at stage 1
            for rec in seen:
                if rec[0].layer == 1 and rec[1].shape[1] in (64, 48):
                    cols = 8
                    for j, (keep, _, _) in enumerate(rec[2].per_image()):
                        on_grid = stride_grid_mask(rec[1][j : j + 1], cols, 3)[0].nonzero().flatten()
                        assert set(on_grid.tolist()) <= set(keep.tolist())
                        assert len(on_grid) == (9 if rec[1].shape[1] == 64 else 6)


# ================================================================================ calibration
def test_adatoken3d_fit_recovers_an_exact_exponential():
    depth, final = 32, 10.0
    x = np.arange(2, depth + 1, dtype=np.float64)
    truth = cal.retention_curve(0.15, final, depth, x)
    fit = cal.fit_retention(truth, final, depth)
    f = np.asarray(fit["retention"])
    assert abs(f[0] - 100) < 1e-3 and abs(f[-1] - final) < 1e-3
    assert fit["objective"] < 1e-6 and abs(fit["B"] - 0.15) < 1e-4
    a, b, c, d = (fit[k] for k in "ABCD")
    np.testing.assert_allclose(a * np.exp(-b * (np.arange(1, 33) - c)) + d, f, atol=1e-6)
    with pytest.raises(ValueError, match="final retention"):
        cal.fit_retention(truth, 100.0, depth)


def test_adatoken3d_information_orientation_and_contribution():
    torch.manual_seed(0)
    attn = torch.rand(20, 20).tril(-1) + torch.eye(20) * 0.1  # causal: nothing above the diagonal
    attn = attn / attn.sum(-1, keepdim=True)
    assert cal.layer_information(attn, 2, 14, "code") == (0.0, 0.0)
    intra, inter = cal.layer_information(attn, 2, 14, "causal")
    assert intra > 0 and inter > 0
    expected_intra = 100 * sum(float(attn[x, y]) for x in range(2, 14) for y in range(2, x))
    assert abs(intra - expected_intra) < 1e-6
    c = cal.contribution([1.0, 2.0, 0.5, 0.1], [0.3, 0.2, 0.1, 0.0])
    assert c.shape == (3,) and c.min() == 0.0 and c.max() == 1.0
    assert cal.stage_layers(32, 3) == [8, 16, 24] and cal.stage_layers(4, 3) == [1, 2, 3]


def test_adatoken3d_calibration_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "schedule.json"
    assert cal.main(["--model", "tiny", "--samples", "2", "--batch-size", "2", "--out", str(out)]) == 0
    schedule = json.loads(out.read_text())
    assert schedule["method"] == "adatoken3d" and schedule["llm_layers"] == 4 and schedule["layers"] == [1, 2, 3]
    ratios = schedule["ratios"]
    assert all(0 < r <= 1 for r in ratios) and ratios == sorted(ratios, reverse=True)
    assert len(schedule["calibration"]["retention"]) == 4 and schedule["calibration"]["samples"] == 2
    model = model_for()
    inputs = batch(TEXTS, seed=6)
    with vlmprune.wrap(model, "adatoken3d", budget=16, schedule=str(out)) as handle:
        forward(model, inputs)
    expected = [progressive_count(ratios, t, 16, 256) for t in range(3)]
    assert [p["out"] for p in handle.stats["points"]] == [[c, c] for c in expected]
    bad = tmp_path / "bad.json"
    for content, message in (
        ("{not json", "not valid JSON"),
        (json.dumps({"method": "adatoken3d", "layers": [1, 2]}), "missing keys"),
        (json.dumps({**schedule, "method": "fastv"}), "is for method 'fastv'"),
        (json.dumps({**schedule, "ratios": [0.5, 0.9, 0.1]}), "non-increasing"),
    ):
        bad.write_text(content)
        with pytest.raises(ValueError, match="option 'schedule' of method 'adatoken3d'.*" + message):
            vlmprune.wrap(model, "adatoken3d", budget=16, schedule=str(bad))
    bad.write_text(json.dumps({**schedule, "llm_layers": 8}))
    with pytest.raises(ValueError, match="calibrated for a 8-layer LLM, this model has 4"):
        vlmprune.wrap(model, "adatoken3d", budget=16, schedule=str(bad))
    with pytest.raises(ValueError, match="given both as a keyword and by the schedule"):
        vlmprune.wrap(model, "adatoken3d", budget=16, schedule=str(out), ratios=(0.9, 0.5, 0.1))
    from vlmprune.embedded import embedded_path

    if not (embedded_path() / "config.json").exists():
        assert cal.main(["--model", "embedded", "--samples", "1", "--out", str(tmp_path / "e.json")]) == 2
        assert "embedded VLM is not built yet" in capsys.readouterr().err
