"""Planted-example oracles (the cards' "test oracle" sections) for the methods that act before
the language model from vision-encoder signals: FlowCut, HiPrune, HoloV, FoPru; their shared
primitives; and exact counts, determinism, batch and manual equivalence through wrap()."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import vlmprune
from tests.contexts import SMALL, make_context
from tests.tiny import batch, tiny_llava
from tests.truth import positions_from_mask, pruned_prompt, record_selections
from vlmprune.context import ModelInfo
from vlmprune.methods.fopru import row_quota
from vlmprune.methods.hiprune import neighbours
from vlmprune.methods.holov import similarity_variance
from vlmprune.primitives import (
    chunk_groups,
    cls_attention,
    rank_within_groups,
    received_attention,
    tile_groups,
    topk_per_group,
)

CLIP_L = ModelInfo("test", 576, (24, 24), True, 24, 22, 32, ("encoder", "projector", "llm"))
CLIP_L_NO_CLS = ModelInfo("test", 576, (24, 24), False, 24, 22, 32, ("encoder", "projector", "llm"))
DEEP = 12  # vision depth of the wrap-level FlowCut tests: feature layer 10, points 2, 4, ..., 10


def context(tokens, budget, info, signals, stage="projector", layer=None, state=None, token_index=None):
    return make_context(tokens, budget, signals, info, stage, layer, token_index, state)


def attending(p: torch.Tensor, heads: int = 2) -> torch.Tensor:
    """Attention probabilities ``[B, H, T, T]`` whose every row is the distribution ``p`` [B, T]:
    the attention each token receives is then exactly ``p``."""
    p = p / p.sum(-1, keepdim=True)
    b, t = p.shape
    return p[:, None, None, :].expand(b, heads, t, t).clone()


def deep_llava(tower="clip", depth=24, attn="sdpa", seed=0):
    """The tiny LLaVA of tests/tiny.py with a ``depth``-layer vision tower (feature layer depth-2)."""
    config = tiny_llava(tower, attn).config
    config.vision_config.num_hidden_layers = depth
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


_MODELS: dict = {}


def model_for(tower="clip", depth=4):
    if (tower, depth) not in _MODELS:
        _MODELS[tower, depth] = tiny_llava(tower) if depth == 4 else deep_llava(tower, depth)
    return _MODELS[tower, depth]


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, position_ids=positions_from_mask(inputs["attention_mask"])).logits


# ================================================================================================
# shared primitives
# ================================================================================================
def test_chunk_groups_first_remainder_chunks_get_one_more():
    g = chunk_groups(10, 4)
    assert torch.bincount(g).tolist() == [3, 3, 2, 2]
    assert torch.equal(g, torch.sort(g).values)
    assert torch.bincount(chunk_groups(576, 16)).tolist() == [36] * 16
    with pytest.raises(ValueError, match="parts"):
        chunk_groups(4, 5)


def test_tile_groups_square_tiles():
    g = tile_groups(torch.arange(256), 16, 16, 16).view(16, 16)
    assert torch.bincount(g.flatten()).tolist() == [16] * 16
    assert g[0, :4].unique().tolist() == [0] and g[0, 4] == 1 and g[4, 0] == 4 and g[15, 15] == 15
    assert torch.bincount(tile_groups(torch.arange(576), 24, 24, 16)).tolist() == [36] * 16


def test_rank_within_groups_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (3, 30), generator=gen).float()  # ties included
    groups = torch.randint(0, 4, (30,), generator=gen)
    rank = rank_within_groups(scores, groups)
    for b in range(3):
        for i in range(30):
            same = (groups == groups[i]).nonzero().flatten()
            better = [j for j in same.tolist() if scores[b, j] > scores[b, i] or (scores[b, j] == scores[b, i] and j < i)]
            assert rank[b, i] == len(better)
    quota = torch.tensor([[1, 0, 2, 5]]).expand(3, -1)
    mask = topk_per_group(scores, groups, quota)
    for g, q in enumerate([1, 0, 2, 5]):
        assert int(mask[:, groups == g].sum(-1).max()) == min(q, int((groups == g).sum()))


def test_received_attention_mean_over_rows_and_heads():
    p = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    want = p.mean(1).mean(1)
    torch.testing.assert_close(received_attention(p), want)
    torch.testing.assert_close(received_attention(p, skip_first=True, reduce="sum"), p.mean(1).sum(1)[:, 1:])
    # head permutation changes nothing (FoPru oracle 3)
    torch.testing.assert_close(received_attention(p[:, [2, 0, 1]]), want)


# ================================================================================================
# FlowCut
# ================================================================================================
def flowcut_run(method, q, k, v, target, info=CLIP_L):
    """Drive FlowCut's points in order as the adapter does, on planted per-layer projections
    ``[L, B, H, T, d]`` (CLS first when ``info.has_cls``). Returns the raster indices alive
    after every point and the selections."""
    b, n = q.shape[1], q.shape[3] - int(info.has_cls)
    alive = torch.arange(n).expand(b, n)
    state, history = {}, []
    off = int(info.has_cls)
    for point in method.points(info):

        def qkv(layer=None, alive=alive):
            idx = torch.cat([torch.zeros(b, off, dtype=torch.long), alive + off], 1)[:, None, :, None]
            return tuple(t[layer].gather(2, idx.expand(-1, t.shape[2], -1, t.shape[-1])) for t in (q, k, v))

        def cls_att(layer=None, reduce="mean", qkv=qkv):
            qq, kk, _ = qkv(layer)
            return cls_attention(qq, kk, reduce=reduce)

        ctx = context(
            torch.zeros(b, alive.shape[1], 4), target, info, {"encoder_qkv": qkv, "cls_attention": cls_att},
            stage="encoder", layer=point.layer, state=state, token_index=alive,
        )
        sel = method.select(ctx)
        assert torch.equal(sel.keep, torch.sort(sel.keep).values), "order kept"
        alive = alive.gather(1, sel.keep)
        history.append((point.layer, alive, sel))
    return history


def planted_qkv(n=576, b=2, layers=24, heads=2, d=8, winner=None, cls_logit=None, seed=0, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(layers, b, heads, 1 + n, d, generator=gen) * scale
    k = torch.randn(layers, b, heads, 1 + n, d, generator=gen) * scale
    v = torch.randn(layers, b, heads, 1 + n, d, generator=gen) * 0.1
    if cls_logit == "uniform":
        q[:, :, :, 0] = 0.0  # CLS attends uniformly: rho = 1
    if winner is not None:
        q[:, :, :, 0] = 1.0
        k[:, :, :, 1 + winner] = 20.0  # CLS -> winner logit 20 * d * d**-0.5: one-hot attention
        v[:, :, :, 1 + winner] = 5.0  # the largest L1 value norm
        v[:, :, :, 0] = 0.5
    return q, k, v


def test_flowcut_points_and_capture_follow_the_feature_layer():
    m = vlmprune.get_method("flowcut")()
    assert [p.layer for p in m.points(CLIP_L)] == list(range(2, 23, 2))  # t = 1, 3, ..., 21 (even rpl)
    assert m.capture_layers(CLIP_L)["encoder"] == tuple(range(22))
    assert [p.layer for p in m.points(SMALL)] == [2]


def test_flowcut_layer_score_is_the_cards_formula():
    q, k, v = (t[0] for t in planted_qkv(n=20, b=1, layers=1, seed=3))
    m = vlmprune.get_method("flowcut")()
    ctx = context(
        torch.zeros(1, 20, 4), 5, CLIP_L,
        {"encoder_qkv": lambda layer=None: (q, k, v), "cls_attention": lambda layer=None, reduce="mean": cls_attention(q, k)},
        stage="encoder", layer=2,
    )
    score, relation = m.layer_score(ctx, 0)
    d = q.shape[-1]
    a = torch.softmax((q[:, :, :1] @ k.transpose(-1, -2))[:, :, 0] * d**-0.5, -1)  # [1, H, T]
    a = a.mean(1)[:, 1:]
    s = torch.softmax((v[:, :, :1] @ v.transpose(-1, -2))[:, :, 0], -1).mean(1)[:, 1:]  # no 1/sqrt(d)
    mnorm = v.mean(1)[:, 1:].abs().sum(-1)
    torch.testing.assert_close(score, (a / a.sum() + s / s.sum()) * mnorm)
    torch.testing.assert_close(relation, a)


def test_flowcut_ema_over_layers_between_points():
    q, k, v = planted_qkv(n=40, b=1, layers=3, seed=4)
    m = vlmprune.get_method("flowcut")()
    info = ModelInfo("test", 40, (5, 8), True, 4, 2, 4, ("encoder",))
    (_, _, sel), = flowcut_run(m, q, k, v, 10, info)
    s0 = m.layer_score(context(torch.zeros(1, 40, 4), 10, info, {"encoder_qkv": lambda layer=None: (q[0], k[0], v[0]), "cls_attention": lambda layer=None, reduce="mean": cls_attention(q[0], k[0])}, "encoder", 2), 0)[0]
    s1 = m.layer_score(context(torch.zeros(1, 40, 4), 10, info, {"encoder_qkv": lambda layer=None: (q[1], k[1], v[1]), "cls_attention": lambda layer=None, reduce="mean": cls_attention(q[1], k[1])}, "encoder", 2), 1)[0]
    torch.testing.assert_close(sel.scores, 0.5 * s0 + 0.5 * s1)
    assert sel.keep.shape == (1, 10)


@pytest.mark.parametrize("target", [1, 8, 64])
def test_flowcut_planted_winner_survives_every_step(target):
    q, k, v = planted_qkv(winner=137)
    history = flowcut_run(vlmprune.get_method("flowcut")(), q, k, v, target)
    for _, alive, _ in history:
        assert (alive == 137).any(-1).all()
    assert history[-1][1].shape == (2, target)


def test_flowcut_exact_budget_counts_non_increasing_and_only_at_even_rpl():
    q, k, v = planted_qkv(seed=5, scale=1.0)
    history = flowcut_run(vlmprune.get_method("flowcut")(), q, k, v, 8)
    counts = [alive.shape[1] for _, alive, _ in history]
    assert [layer for layer, _, _ in history] == list(range(2, 23, 2))
    assert counts == sorted(counts, reverse=True) and counts[-1] == 8
    assert counts[0] < 576  # random attention is far from uniform: the first step prunes


def test_flowcut_entropy_extremes():
    n, k = 576, 64
    method = vlmprune.get_method("flowcut")()
    uniform = flowcut_run(method, *planted_qkv(cls_logit="uniform"), k)
    assert [a.shape[1] for _, a, _ in uniform] == [n] * 10 + [k]  # rho = 1: r = 0 until the last step
    one_hot = flowcut_run(method, *planted_qkv(winner=3), k)
    assert one_hot[0][1].shape[1] == n - round((n - k) / math.sqrt(20))  # rho ~ 0 at t = 1 (rpl = 20)


def test_flowcut_batch_max_count_versus_per_image():
    q, k, v = planted_qkv(cls_logit="uniform")
    q1, k1, v1 = planted_qkv(winner=3)
    q[:, 1], k[:, 1], v[:, 1] = q1[:, 1], k1[:, 1], v1[:, 1]  # image 0 uniform, image 1 one-hot
    first = flowcut_run(vlmprune.get_method("flowcut")(), q, k, v, 64)[0][1]
    assert first.shape[1] == 576 - 114  # the batch maximum of r applies to both images
    per_image = vlmprune.get_method("flowcut")(count="per_image")
    assert per_image.encoder_per_image()
    with pytest.raises(RuntimeError, match="one image at a time"):
        flowcut_run(per_image, q, k, v, 64)
    counts = [flowcut_run(per_image, q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], 64)[0][1].shape[1] for i in range(2)]
    assert counts == [576, 576 - 114]


def test_flowcut_mean_query_relay_without_cls():
    n = 576
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(24, 1, 2, n, 8, generator=gen) * 0.1 + 1.0
    k = torch.randn(24, 1, 2, n, 8, generator=gen) * 0.1
    v = torch.randn(24, 1, 2, n, 8, generator=gen) * 0.1
    k[:, :, :, 200] = 20.0
    v[:, :, :, 200] = 5.0
    m = vlmprune.get_method("flowcut")()
    history = flowcut_run(m, q, k, v, 16, CLIP_L_NO_CLS)
    assert all((alive == 200).any() for _, alive, _ in history) and history[-1][1].shape == (1, 16)
    with pytest.raises(ValueError, match="CLS"):
        vlmprune.get_method("flowcut")(relay="cls").check(CLIP_L_NO_CLS)


def test_flowcut_refuses_a_schedule():
    m = vlmprune.get_method("flowcut")()
    ctx = context(torch.zeros(1, 10, 4), 5, SMALL, {}, stage="encoder", layer=2)
    ctx.target = 3
    with pytest.raises(ValueError, match="schedule"):
        m.select(ctx)


QWEN = ModelInfo("qwen2_vl", None, None, False, 32, 31, 28, ("encoder", "projector", "llm"), patches_per_token=4)


def test_flowcut_qwen_schedule_follows_the_qwen_port():
    """Official FlowCut_Qwen: rpl = depth - t - 1, so the last pruning runs after the last block
    (before the merger: encoder point 32 of 32); then the LLM stage before layer 2."""
    m = vlmprune.get_method("flowcut")()
    assert [str(p) for p in m.points(QWEN)] == [f"encoder:{layer}" for layer in range(2, 33, 2)] + ["llm:2"]
    assert m.capture_layers(QWEN) == {"encoder": tuple(range(32)), "llm": (1,)}
    m.check(QWEN)
    assert m.needs == {"encoder_qkv", "relay_qkv"}
    off = vlmprune.get_method("flowcut")(llm_stage="off")
    assert [str(p) for p in off.points(QWEN)][-1] == "encoder:32" and off.capture_layers(QWEN)["llm"] == ()
    assert [str(p) for p in vlmprune.get_method("flowcut")(llm_stage="on").points(CLIP_L)][-2:] == ["encoder:22", "llm:2"]
    with pytest.raises(ValueError, match="llm_layer"):
        vlmprune.get_method("flowcut")(llm_layer=28).check(QWEN)


def flowcut_run_groups(method, q, k, v, target, info=QWEN):
    """:func:`flowcut_run` for a merge-group tower: projections ``[L, B, H, 4 N, d]`` per patch,
    each token's 4 patches on consecutive rows; the encoder points only."""
    b, n = q.shape[1], q.shape[3] // 4
    alive = torch.arange(n).expand(b, n)
    state, history = {}, []
    for point in [p for p in method.points(info) if p.stage == "encoder"]:

        def qkv(layer=None, alive=alive):
            rows = (alive[:, :, None] * 4 + torch.arange(4)).flatten(1)[:, None, :, None]
            return tuple(t[layer].gather(2, rows.expand(-1, t.shape[2], -1, t.shape[-1])) for t in (q, k, v))

        ctx = context(torch.zeros(b, alive.shape[1], 4), target, info, {"encoder_qkv": qkv}, "encoder", point.layer, state, alive)
        sel = method.select(ctx)
        alive = alive.gather(1, sel.keep)
        history.append((point.layer, alive, sel))
    return history


def test_flowcut_qwen_groups_score_the_sum_of_their_patches():
    n, layers = 64, 32
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(layers, 1, 2, 4 * n, 8, generator=gen) * 0.1 + 1.0
    k = torch.randn(layers, 1, 2, 4 * n, 8, generator=gen) * 0.1
    v = torch.randn(layers, 1, 2, 4 * n, 8, generator=gen) * 0.1
    k[:, :, :, 4 * 37 + 2] = 20.0  # one patch of group 37 takes the mean query's attention
    v[:, :, :, 4 * 37 + 2] = 5.0
    m = vlmprune.get_method("flowcut")()
    ctx = context(torch.zeros(1, n, 4), 4, QWEN, {"encoder_qkv": lambda layer=None: (q[0], k[0], v[0])}, "encoder", 2)
    score, relation = m.layer_score(ctx, 0)
    a = torch.softmax((q[0].mean(2, keepdim=True) @ k[0].transpose(-1, -2))[:, :, 0] * 8**-0.5, -1).mean(1)  # [1, 4N]
    torch.testing.assert_close(relation, a)
    torch.testing.assert_close(score, (a * v[0].mean(1).abs().sum(-1)).view(1, n, 4).sum(-1))
    history = flowcut_run_groups(m, q, k, v, 4)
    assert all((alive == 37).any() for _, alive, _ in history)
    assert history[-1][0] == 32 and history[-1][1].shape == (1, 8)  # encoder_keep = 2: twice the budget
    assert [alive.shape[1] for _, alive, _ in history] == sorted((alive.shape[1] for _, alive, _ in history), reverse=True)


def test_flowcut_next_crops_keep_half_the_image_budget():
    """LLaVA-NeXT code: every crop keeps target_num / 2 in the ViT, whatever its share."""
    from vlmprune.context import ImagePart

    next_info = ModelInfo("llava_next", 576, (24, 24), True, 24, 22, 32, ("encoder", "projector", "llm"))
    q, k, v = planted_qkv(n=576, b=2, seed=9)
    m = vlmprune.get_method("flowcut")()
    assert [str(p) for p in m.points(next_info)][-2:] == ["encoder:22", "llm:2"]
    alive, state = torch.arange(576).expand(2, 576), {}
    for point in m.points(next_info)[:-1]:
        def qkv(layer=None, alive=alive):
            idx = torch.cat([torch.zeros(2, 1, dtype=torch.long), alive + 1], 1)[:, None, :, None]
            return tuple(t[layer].gather(2, idx.expand(-1, t.shape[2], -1, t.shape[-1])) for t in (q, k, v))

        signals = {"encoder_qkv": qkv, "cls_attention": lambda layer=None, reduce="mean", qkv=qkv: cls_attention(*qkv(layer)[:2])}
        ctx = context(torch.zeros(2, alive.shape[1], 4), 9, next_info, signals, "encoder", point.layer, state, alive)
        ctx.parts = [ImagePart({}, alive[j], (5 * 24, 24), 2000, 131, 131, part=j) for j in range(2)]  # the crop's share: 9
        alive = alive.gather(1, m.select(ctx).keep)
    assert alive.shape == (2, 65)
    with pytest.raises(ValueError, match="crop_keep"):
        vlmprune.get_method("flowcut")(crop_keep=0.0)
    with pytest.raises(ValueError, match="'encoder_keep' of method 'flowcut' must be >= 1"):
        vlmprune.get_method("flowcut")(encoder_keep=0.5)
    with pytest.raises(ValueError, match="'llm_stage' of method 'flowcut' must be one of"):
        vlmprune.get_method("flowcut")(llm_stage="yes")


def test_flowcut_llm_stage_relays_through_the_last_prompt_token():
    """``compute_score_llm``: softmax over the visual tokens only of the last token's q.k and v.v
    (both / sqrt(d)), summed, times the head-mean value L1 norm; keeps the budget in order."""
    n, heads, d = 30, 4, 16
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, heads, 1 + n, d, generator=gen) for _ in range(3))
    k[1, :, 1 + 11] = q[1, :, 0] * 5.0  # image 1: the relay looks at token 11
    v[1, :, 1 + 11] = v[1, :, 0] * 3.0
    m = vlmprune.get_method("flowcut")()
    ctx = context(torch.zeros(2, n, 4), 5, QWEN, {"relay_qkv": lambda layer=None: (q, k, v)}, "llm", 2)
    sel = m.select(ctx)
    rel = torch.softmax((q[:, :, :1] @ k[:, :, 1:].transpose(-1, -2))[:, :, 0] / d**0.5, -1).mean(1)
    sem = torch.softmax((v[:, :, :1] @ v[:, :, 1:].transpose(-1, -2))[:, :, 0] / d**0.5, -1).mean(1)
    want = (rel + sem) * v[:, :, 1:].mean(1).abs().sum(-1)
    torch.testing.assert_close(sel.scores, want)
    assert torch.equal(sel.keep, torch.sort(want.topk(5).indices).values) and (sel.keep[1] == 11).any()
    few = m.select(context(torch.zeros(2, 4, 4), 4, QWEN, {}, "llm", 2))  # nothing above the budget: no signal read
    assert torch.equal(few.keep, torch.arange(4).expand(2, 4))


def test_flowcut_through_wrap_progressive_exact_and_deterministic():
    model = model_for("clip", DEEP)
    inputs = batch([[10, 11], [20, 21, 22]], seed=7)
    runs = []
    for _ in range(2):
        with vlmprune.wrap(model, "flowcut", budget=8) as h:
            runs.append((logits(model, inputs), h.stats))
    (out, stats), (out2, stats2) = runs
    assert torch.equal(out, out2) and stats["points"] == stats2["points"]
    assert [p["point"] for p in stats["points"]] == [f"encoder:{layer}" for layer in range(2, DEEP - 1, 2)]
    outs = [p["out"] for p in stats["points"]]
    assert all(o[0] == o[1] for o in outs)  # batch-max count: both images alike
    assert [o[0] for o in outs] == sorted((o[0] for o in outs), reverse=True) and outs[-1] == [8, 8]
    assert stats["llm_visual_tokens"] == [8, 8]


def test_flowcut_multi_point_manual_equivalence():
    """Replaying the recorded selections by hand on the unwrapped tower gives the same logits."""
    model = model_for("clip", DEEP)
    inputs = batch([[10, 11], [20, 21, 22]], seed=8)
    with vlmprune.wrap(model, "flowcut", budget=12) as h, record_selections(h) as seen:
        pruned = logits(model, inputs)
    keeps = {point.layer: sel.keep for point, _, sel in seen}
    vm = model.model.vision_tower
    with torch.no_grad():
        hid = vm.pre_layrnorm(vm.embeddings(inputs["pixel_values"]))
        for i, layer in enumerate(vm.encoder.layers[: DEEP - 1]):
            if i in keeps:
                idx = keeps[i].unsqueeze(-1).expand(-1, -1, hid.shape[-1])
                hid = torch.cat([hid[:, :1], hid[:, 1:].gather(1, idx)], 1)
            hid = layer(hid, None)
        tokens = [model.model.multi_modal_projector(hid[j, 1:]) for j in range(2)]
        embeds, mask, pos = pruned_prompt(model, inputs, tokens)
        ref = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
    for i in range(2):
        n = int(mask[i].sum())
        torch.testing.assert_close(pruned[i, -n:], ref[i, -n:], atol=1e-5, rtol=1e-5)


def test_flowcut_per_image_batch_equals_single():
    model = model_for("clip", DEEP)
    texts = [[10, 11, 12], [20]]
    inputs = batch(texts, seed=9)
    with vlmprune.wrap(model, "flowcut", budget=10, count="per_image") as h:
        with record_selections(h) as seen:
            batched = logits(model, inputs)[:, -1]
        final = [sel.keep for point, _, sel in seen]
        assert h.stats["llm_visual_tokens"] == [10, 10]
        for i, text in enumerate(texts):
            single = batch([text], seed=9)
            single["pixel_values"] = inputs["pixel_values"][i : i + 1]
            with record_selections(h) as alone:
                torch.testing.assert_close(logits(model, single)[0, -1], batched[i], atol=1e-5, rtol=1e-5)
            assert len(alone) == len(seen) // 2 and all(
                torch.equal(a[2].keep, b) for a, b in zip(alone, final[i * len(alone) : (i + 1) * len(alone)])
            )


def test_flowcut_siglip_falls_back_or_errors():
    model = model_for("siglip")
    inputs = batch([[10, 11]], seed=10)
    with pytest.raises(ValueError, match="relay"):
        vlmprune.wrap(model, "flowcut", budget=8, relay="cls")
    with vlmprune.wrap(model, "flowcut", budget=8) as h:
        logits(model, inputs)
    assert h.stats["llm_visual_tokens"] == [8]


# ================================================================================================
# HiPrune
# ================================================================================================
def hiprune_select(g_obj, g_deep, budget, info=CLIP_L, **options):
    """HiPrune on planted received attention (``[B, N]`` without CLS) of its two layers."""
    m = vlmprune.get_method("hiprune")(**options)
    obj, deep = m.layers(info)
    pad = (lambda g: torch.cat([torch.full_like(g[:, :1], 1e-4), g], 1)) if info.has_cls else (lambda g: g)
    planted = {obj: attending(pad(g_obj)), deep: attending(pad(g_deep))}
    sig = {"encoder_attention": lambda layer=None: planted[layer]}
    return m.select(context(torch.zeros(g_obj.shape[0], g_obj.shape[1], 4), budget, info, sig))


def test_hiprune_layers_scale_with_depth():
    m = vlmprune.get_method("hiprune")()
    assert m.layers(CLIP_L) == (8, 22)  # README: object layer 9 (1-indexed), deep = attentions[-2]
    assert m.layers(SMALL) == (1, 2)  # round(9 * 4 / 24) = 2 -> block 1
    assert vlmprune.get_method("hiprune")(object_layer=3, layer_rule="absolute", deep_layer=4).layers(SMALL) == (2, 3)
    with pytest.raises(ValueError, match="object_layer"):
        vlmprune.get_method("hiprune")(object_layer=9, layer_rule="absolute").layers(SMALL)


def test_hiprune_buffers_disjoint_registers_and_deep_winner():
    gen = torch.Generator().manual_seed(11)
    g_obj = torch.rand(1, 576, generator=gen) * 0.1
    for i, val in ((5 * 24 + 7, 1.0), (12 * 24 + 12, 0.9), (18 * 24 + 3, 0.8)):  # interior, non-adjacent
        g_obj[0, i] = val
    g_deep = torch.rand(1, 576, generator=gen) * 0.1
    g_deep[0, 300] = 0.5  # deep winner outside the anchors' neighbourhoods
    sel = hiprune_select(g_obj, g_deep, 128)  # k_a = round(128 * 0.1 / 5) = 3
    keep = sel.keep[0].tolist()
    assert len(keep) == len(set(keep)) == 128 and keep == sorted(keep)
    for i in (5 * 24 + 7, 12 * 24 + 12, 18 * 24 + 3):
        assert {i, i - 1, i + 1, i - 24, i + 24} <= set(keep)
    assert int((sel.scores >= 2).sum()) == 15 and 300 in keep


def test_hiprune_flat_neighbours_wrap_and_clamp_like_the_code():
    anchors = torch.tensor([[0, 23]])
    flat = neighbours(anchors, 24, 24, "flat")[0].nonzero().flatten().tolist()
    assert flat == [0, 1, 22, 23, 24, 47]  # -1 and -24 clamp to 0; 23 + 1 wraps to row 1
    grid = neighbours(anchors, 24, 24, "grid")[0].nonzero().flatten().tolist()
    assert grid == [0, 1, 22, 23, 24, 47] and neighbours(torch.tensor([[23]]), 24, 24, "grid")[0].nonzero().flatten().tolist() == [22, 23, 47]
    # through select: one anchor (budget 64) at 23; in flat mode 0 and 24 are forced in
    g_obj = torch.full((1, 576), 0.01)
    g_obj[0, 23] = 1.0
    g_deep = torch.rand(1, 576, generator=torch.Generator().manual_seed(12)) * 0.1 + 0.1
    g_deep[0, [0, 24]] = 0.0
    assert set((hiprune_select(g_obj, g_deep, 64).scores[0] >= 2).nonzero().flatten().tolist()) == {0, 22, 23, 24, 47}
    grid_sel = hiprune_select(g_obj, g_deep, 64, neighbours="grid")
    assert set((grid_sel.scores[0] >= 2).nonzero().flatten().tolist()) == {22, 23, 47}
    assert 0 not in grid_sel.keep[0].tolist() and 24 not in grid_sel.keep[0].tolist()


def test_hiprune_without_cls_and_anchor_rounding():
    g_obj = torch.rand(2, 576, generator=torch.Generator().manual_seed(13))
    g_deep = torch.rand(2, 576, generator=torch.Generator().manual_seed(14))
    sel = hiprune_select(g_obj, g_deep, 125, info=CLIP_L_NO_CLS)  # round(2.5) = 2 anchors (half to even)
    assert sel.keep.shape == (2, 125)
    anchors = torch.sort(g_obj, -1, descending=True).indices[:, :2]
    chosen = neighbours(anchors, 24, 24, "flat")
    torch.testing.assert_close((sel.scores >= 2), chosen)


# ================================================================================================
# HoloV
# ================================================================================================
def holov_select(attn, feats, budget, info=CLIP_L, **options):
    m = vlmprune.get_method("holov")(**options)
    sig = {
        "cls_attention": lambda layer=None, reduce="mean": attn,
        "encoder_attention": lambda layer=None: attending(attn),
        "projected": lambda: feats,
    }
    return m.select(context(torch.zeros(*attn.shape, 4), budget, info, sig))


def holov_reference(x, a, parts, k, alpha=0.09, eps=1e-6):
    """The card's code-exact algorithm for one image, written as loops (zero padding -> None)."""
    n = x.shape[0]
    size, rem = n // parts, n % parts
    bounds, start = [], 0
    for p in range(parts):
        end = start + size + (1 if p < rem else 0)
        bounds.append((start, end))
        start = end
    scores = []
    for s, e in bounds:
        xc, ac = x[s:e].double(), a[s:e].double()
        cnt = e - s
        if cnt <= 1:
            scores.append(ac.mean())
            continue
        f = xc / (xc.norm(dim=1, keepdim=True) + eps)
        sim = (f @ f.T) * (1 - torch.eye(cnt, dtype=torch.double))
        mu = sim.sum(1) / (cnt - 1)
        var = ((sim - mu[:, None]) ** 2).sum(1) / (cnt - 1)
        sa = ac * 1e3
        var = var * (sa.abs().mean() / (var.abs().mean() + eps))
        scores.append((sa + alpha * var).mean())
    scores = torch.stack(scores)
    w = scores / (scores.sum() + eps)
    alloc = (w * k).floor().long()
    remaining = k - int(alloc.sum())
    if remaining > 0:
        for idx in torch.sort(w, descending=True, stable=True).indices[:remaining]:
            alloc[idx] += 1
    out = []
    for (s, e), c in zip(bounds, alloc.tolist()):
        if c >= e - s:
            out.extend(range(s, e))
        elif c > 0:
            out.extend((s + torch.sort(a[s:e], descending=True, stable=True).indices[:c]).tolist())
    return out


def test_holov_code_mode_matches_the_reference_loop():
    gen = torch.Generator().manual_seed(15)
    feats = torch.randn(3, 576, 16, generator=gen)
    attn = torch.softmax(torch.randn(3, 576, generator=gen) * 2, -1)
    overflowed = 0
    for k in (64, 128, 192):
        sel = holov_select(attn, feats, k, overflow="redistribute")
        drop = holov_select(attn, feats, k)  # default: the code's tokens, without its zero padding
        assert sel.keep.shape == (3, k)
        for b in range(3):
            ref = holov_reference(feats[b], attn[b], 16, k)
            assert drop.keep[b].tolist() == ref
            if len(ref) == k:
                assert sel.keep[b].tolist() == ref
            overflowed += len(ref) < k
    assert 0 < overflowed < 9  # both cases occur


def chunk_counts(keep, parts=16, n=576):
    return torch.bincount(chunk_groups(n, parts)[keep], minlength=parts).tolist()


def test_holov_allocation_is_proportional_to_chunk_attention():
    masses = torch.arange(1, 17, dtype=torch.float)
    attn = (masses / 36).repeat_interleave(36)[None] / masses.sum()
    feats = torch.randn(1, 576, 16, generator=torch.Generator().manual_seed(16))
    sel = holov_select(attn, feats, 64)
    share = 64 * masses / masses.sum()
    want = share.floor().long()
    for idx in torch.sort(share, descending=True).indices[: 64 - int(want.sum())]:
        want[idx] += 1
    assert chunk_counts(sel.keep[0]) == want.tolist()


def test_holov_code_mode_ignores_features_and_paper_mode_does_not():
    gen = torch.Generator().manual_seed(17)
    attn = torch.full((1, 576), 1 / 577)
    feats = torch.ones(1, 576, 8) + torch.randn(1, 576, 8, generator=gen) * 0.01
    feats[0, :36:2] = -feats[0, :36:2]  # chunk 0: similarities +-1, by far the largest variance
    code = holov_select(attn, feats, 72)  # K/P = 4.5: away from the floor's edge
    assert sorted(set(chunk_counts(code.keep[0]))) == [4, 5]  # coverage: floor or ceil of K/P everywhere
    paper = holov_select(attn, feats, 72, mode="paper")
    assert chunk_counts(paper.keep[0])[0] > 5 and paper.keep.shape == (1, 72)
    # variance invariance in code mode: other features, same attention -> same tokens
    masses = torch.arange(1, 17, dtype=torch.float)
    attn = (masses / 36).repeat_interleave(36)[None] / masses.sum() + torch.rand(1, 576, generator=gen) * 1e-4
    one = holov_select(attn, feats, 64)
    assert torch.equal(one.keep, holov_select(attn, torch.randn(1, 576, 8, generator=gen), 64).keep)
    assert not torch.equal(one.keep, holov_select(attn, feats, 64, mode="paper").keep)


def test_holov_planted_winner_and_the_low_weight_chunk_caveat():
    attn = torch.full((1, 64), 0.001)
    attn[0, 0] = 0.05  # global argmax, in chunk 0 (mean 0.0132)
    attn[0, 4:20] = 0.03  # chunks 1-4 carry most of the weight
    attn[0, 9] = 0.04  # chunk 2's argmax
    sel = holov_select(attn, torch.randn(1, 64, 8), 4, info=SMALL)
    kept = sel.keep[0].tolist()
    assert len(kept) == 4 and 9 in kept
    assert 0 not in kept  # documented behaviour: a low-weight chunk's global argmax can be dropped


def test_holov_overflow_redistribute_or_drop_and_order():
    attn = torch.full((2, 576), 1e-5)
    attn[:, :36] = torch.linspace(0.02, 0.01, 36)  # chunk 0 holds almost everything
    attn[1, 40] = 0.03
    feats = torch.randn(2, 576, 8, generator=torch.Generator().manual_seed(18))
    sel = holov_select(attn, feats, 64, overflow="redistribute")
    assert sel.keep.shape == (2, 64) and chunk_counts(sel.keep[0])[0] == 36
    drop = holov_select(attn, feats, 64)  # default: the code's tokens, fewer than the budget
    assert isinstance(drop.keep, list) and all(k.numel() < 64 for k in drop.keep)
    # code order: chunk 1 (partly kept) in descending attention, raster order otherwise
    k1 = sel.keep[1].tolist()
    assert k1[:36] == list(range(36)) and k1[36] == 40
    raster = holov_select(attn, feats, 64, order="raster", overflow="redistribute")
    assert torch.equal(raster.keep, torch.sort(sel.keep).values)


QWEN_64 = ModelInfo("qwen2_5_vl", 64, (8, 8), False, 4, 3, 4, ("encoder", "projector", "llm"))


@pytest.mark.parametrize("keep, crops", [(21, 5), (14, 8)])  # int(64 * 0.33), int(64 * 0.22)
def test_holov_qwen_crop_count_follows_the_official_port(keep, crops):
    # the port: P = max(1, int(1024/576 * N / keep)); 64 tokens at 33 % and 22 % -> 5 and 8 crops
    assert max(1, int(((1024 / 576) * 64) / keep)) == crops
    gen = torch.Generator().manual_seed(keep)
    feats = torch.randn(2, 64, 16, generator=gen)
    attn = torch.softmax(torch.randn(2, 64, generator=gen) * 2, -1)
    sel = holov_select(attn, feats, keep, info=QWEN_64)
    for b in range(2):
        assert sel.keep[b].tolist() == holov_reference(feats[b], attn[b], crops, keep)
    fixed = holov_select(attn, feats, keep, info=QWEN_64, crops=16)  # the old default, as an option
    assert [k.tolist() for k in fixed.keep] == [holov_reference(feats[b], attn[b], 16, keep) for b in range(2)]
    llava = holov_select(attn, feats, keep, info=SMALL)  # LLaVA: num_patches = 16 at every budget
    assert [k.tolist() for k in llava.keep] == [holov_reference(feats[b], attn[b], 16, keep) for b in range(2)]


def test_holov_2d_crops_cover_every_tile():
    attn = torch.full((1, 576), 1 / 577)
    sel = holov_select(attn, torch.randn(1, 576, 8), 40, layout="2d")
    tiles = tile_groups(sel.keep[0], 24, 24, 16)
    assert sorted(set(torch.bincount(tiles, minlength=16).tolist())) == [2, 3]


def test_similarity_variance_singleton_and_pair():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    var = similarity_variance(x, torch.tensor([0, 0, 1]), torch.tensor([2, 1]))
    # pair: S offdiag 0 -> mu 0, var 0; singleton: 0
    assert var.tolist() == [[0.0, 0.0, 0.0]]


# ================================================================================================
# FoPru
# ================================================================================================
def fopru_select(sigma, budget, info=CLIP_L, **options):
    m = vlmprune.get_method("fopru")(**options)
    full = torch.cat([torch.full_like(sigma[:, :1], 1e-4), sigma], 1) if info.has_cls else sigma
    sig = {
        "encoder_attention": lambda layer=None: attending(full, heads=3),
        "cls_attention": lambda layer=None, reduce="mean": sigma / sigma.sum(-1, keepdim=True),
    }
    return m.select(context(torch.zeros(*sigma.shape, 4), budget, info, sig))


@pytest.mark.parametrize("k", [1, 7, 100])
def test_fopru_rank_keeps_the_planted_column(k):
    sigma = torch.rand(2, 576, generator=torch.Generator().manual_seed(19)) * 0.1
    sigma[:, 333] = 1.0
    sel = fopru_select(sigma, k)
    assert sel.keep.shape == (2, k) and (sel.keep == 333).any(-1).all()
    assert bool((sel.keep[:, 1:] > sel.keep[:, :-1]).all())


def test_fopru_whole_rows_and_per_row_quota():
    sigma = torch.arange(24, 0, -1, dtype=torch.float).repeat_interleave(24)[None]  # constant rows, decreasing
    sel = fopru_select(sigma, 48, strategy="row")
    assert sel.keep[0].tolist() == list(range(48))
    sigma2 = sigma + torch.rand(1, 576, generator=torch.Generator().manual_seed(20)) * 0.1
    part = fopru_select(sigma2, 51, strategy="row").keep[0]
    assert part[:48].tolist() == list(range(48))
    assert part[48:].tolist() == sorted((48 + torch.sort(sigma2[0, 48:72], descending=True).indices[:3]).tolist())
    per_row = fopru_select(sigma2, 50, strategy="row", row_mode="per_row_topk").keep[0]
    counts = torch.bincount(per_row // 24, minlength=24).tolist()
    assert counts == [3, 3] + [2] * 22  # 50 = 24 * 2 + 2: the two best rows get one more
    quota = row_quota(torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([4, 4, 4]), 6, "whole_rows")
    assert quota.tolist() == [[0, 4, 2]]


def test_fopru_cls_significance_needs_cls():
    with pytest.raises(ValueError, match="significance"):
        vlmprune.get_method("fopru")(significance="cls").check(CLIP_L_NO_CLS)
    sigma = torch.rand(1, 576)
    sigma[0, 10] = 5.0
    assert 10 in fopru_select(sigma, 5, significance="cls").keep[0].tolist()


# ================================================================================================
# through wrap(): exact counts reaching the LLM, determinism, CLS-free towers
# ================================================================================================
@pytest.mark.parametrize("name,options", [
    ("hiprune", {}), ("hiprune", {"neighbours": "grid"}), ("holov", {}), ("holov", {"mode": "paper", "layout": "2d"}),
    ("fopru", {}), ("fopru", {"strategy": "row"}), ("flowcut", {}),
])
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_exact_counts_and_determinism_through_wrap(name, options, tower):
    model = model_for(tower)
    inputs = batch([[10, 11, 12], [20]], seed=21)
    outs = []
    for _ in range(2):
        with vlmprune.wrap(model, name, budget=40, **options) as h:
            outs.append(logits(model, inputs))
        assert h.stats["llm_visual_tokens"] == [40, 40]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name,options", [("holov", {"saliency": "cls"}), ("fopru", {"significance": "cls"}), ("flowcut", {"relay": "cls"})])
def test_cls_only_options_error_on_siglip(name, options):
    with pytest.raises(ValueError, match="CLS"):
        vlmprune.wrap(model_for("siglip"), name, budget=16, **options)


def test_methods_listed_with_metadata():
    listed = {m["name"]: m for m in vlmprune.methods()}
    for name, arxiv in (("flowcut", "2505.19536"), ("hiprune", "2508.00553"), ("holov", "2510.02912"), ("fopru", "2411.14164")):
        assert listed[name]["paper"]["arxiv"] == arxiv and listed[name]["training_free"]
        assert all(o["doc"] for o in listed[name]["options"].values())
    assert listed["flowcut"]["stages"] == ["encoder", "llm"] and listed["hiprune"]["stages"] == ["projector"]
