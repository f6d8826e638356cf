"""SparseVLM (vlmprune/methods/sparsevlm.py): the card's and the code's oracles on planted tensors
(raters, DPC-KNN recycling, the per-budget counts, the v1.0 rank rule) and one pruning layer
rebuilt by hand through a real tiny LLaVA; the conformance kit runs keep-all, manual (without
recycling), batch, cache, determinism and unwrap on every VLM family."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import vlmprune
from vlmprune.context import Signals, TokenContext
from vlmprune.methods.sparsevlm import (
    COUNTS,
    SparseVLM,
    density_peak_merge,
    select_raters,
)

from .tiny import IMAGE_TOKEN, batch, tiny_llava
from .truth import full_embeddings


def raters_by_hand(image, text):
    """The card: relevance of text token j = mean over image tokens i of softmax_j(<v_i, t_j>)."""
    rel = []
    for j in range(text.shape[0]):
        total = 0.0
        for i in range(image.shape[0]):
            logits = [float(image[i] @ text[k]) for k in range(text.shape[0])]
            total += math.exp(logits[j]) / sum(math.exp(v) for v in logits)
        rel.append(total / image.shape[0])
    mean = sum(rel) / len(rel)
    return [j for j, r in enumerate(rel) if r > mean]


def dpc_by_hand(x, k):
    """TCFormer's DPC-KNN as the code runs it, with loops: ``(centres, clusters as index lists, means)``."""
    m, c = x.shape
    d = [[float((x[i] - x[j]).norm()) / c**0.5 for j in range(m)] for i in range(m)]
    dens = [math.exp(-sum(v * v for v in sorted(row)[:k]) / k) for row in d]
    top = max(max(row) for row in d)
    delta = [min([d[i][j] for j in range(m) if dens[j] > dens[i] or (dens[j] == dens[i] and j < i)], default=top) for i in range(m)]
    score = [delta[i] * dens[i] for i in range(m)]
    centres = sorted(range(m), key=lambda i: -score[i])[:k]
    groups = [[] for _ in centres]
    for i in range(m):
        groups[centres.index(i) if i in centres else min(range(k), key=lambda g: d[centres[g]][i])].append(i)
    means = torch.stack([x[g].sum(0) / (len(g) + 1e-6) for g in groups])
    return centres, groups, means


def context(tokens, attention, budget, layer=3, n0=None, raters=None, target=None):
    """A point of a 32-layer LLM with planted rater rows ``attention`` (one ``[Q, N]`` per image)."""
    b, n = tokens.shape[:2]
    text = torch.randn(5, tokens.shape[-1])
    signals = Signals({
        "text_attention": lambda **kw: attention,
        "llm_input": lambda: [(torch.randn(n0 or n, tokens.shape[-1]), text)] * b,
        "hidden": lambda: tokens,
    })
    ctx = TokenContext(tokens=tokens, stage="llm", layer=layer, budget=budget, target=target or budget, grid=(1, n),
                       token_index=torch.arange(n).expand(b, -1), signals=signals, info=SimpleNamespace(llm_layers=32))
    if raters is not None:
        for s in ctx.state.images:
            s.update(raters=raters, n0=n0 or n, budget=budget)
    return ctx


def test_raters_are_the_text_tokens_above_mean_relevance():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(6, 4, generator=g)
    text = torch.randn(5, 4, generator=g) * 0.3
    text[1] = image.mean(0) * 3  # planted: two text tokens every image token attends to
    text[3] = image.mean(0) * 2.9
    expected = raters_by_hand(image, text)
    assert 1 in expected and 3 in expected
    assert select_raters(image, text).tolist() == expected


def test_recycling_clusters_are_the_by_hand_dpc_knn_means():
    g = torch.Generator().manual_seed(1)
    planted = [torch.tensor([0.0, 0.0]), torch.tensor([9.0, 0.0]), torch.tensor([0.0, 9.0])]
    sizes = (3, 3, 3)  # k = 3 neighbours (self included) stay inside each planted cluster
    x = torch.cat([c + 0.3 * torch.randn(s, 2, generator=g) for c, s in zip(planted, sizes)])
    x = x[torch.randperm(9, generator=g)]
    centres, assign, means = density_peak_merge(x, 3)
    ref_centres, groups, ref_means = dpc_by_hand(x, 3)
    assert centres.tolist() == ref_centres
    truth = [sorted(i for i in range(9) if (x[i] - c).norm() < 2) for c in planted]
    assert sorted(groups) == sorted(truth)  # the planted clusters
    assert [sorted((assign == c).nonzero().flatten().tolist()) for c in range(3)] == groups
    torch.testing.assert_close(means, ref_means)
    # a bigger random set, clusters of mixed sizes
    y = torch.randn(40, 8, generator=g)
    c2, a2, m2 = density_peak_merge(y, 5)
    r2, g2, rm2 = dpc_by_hand(y, 5)
    assert c2.tolist() == r2 and [sorted((a2 == c).nonzero().flatten().tolist()) for c in range(5)] == g2
    torch.testing.assert_close(m2, rm2)


def test_one_point_keeps_the_official_count_and_recycles_the_best_deleted():
    """576 tokens at budget 192, first point: the code's 300 kept; of the 276 deleted the
    int(276 * 0.3) + 1 = 83 best-scored are clustered into int(83 / 10) + 1 = 9 means."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(1, 576, 8, generator=g)
    score = torch.randperm(576, generator=g).float()
    attention = [torch.stack([score, score + 1, score * 2]) / 1000]  # the mean over raters ranks like ``score``
    sel = SparseVLM().select(context(tokens, attention, 192))
    order = score.argsort(descending=True)
    kept, deleted = order[:300], order[300:]
    recycled = deleted[:83]
    centres, _, means = dpc_by_hand(tokens[0, recycled], 9)
    slots = recycled[centres]
    expected = torch.cat([kept, slots]).sort()
    assert sel.keep[0].tolist() == expected.values.tolist()
    assert sel.counts() == [309]
    values = torch.cat([tokens[0, kept], means])[expected.indices]
    torch.testing.assert_close(sel.merged[0], values)
    no_recycling = SparseVLM(recycle=False).select(context(tokens, attention, 192))
    assert no_recycling.merged is None and no_recycling.keep[0].tolist() == kept.sort().values.tolist()


@pytest.mark.parametrize("budget", [192, 128, 96, 64])
def test_counts_follow_the_codes_lists(budget):
    method = SparseVLM()
    for t, n in enumerate((576, 400, 300)):
        ctx = SimpleNamespace(budget=budget, target=budget)
        assert method.count(ctx, t, 576, torch.rand(3, n)) == min(COUNTS["1.5"][budget][t], n - 1)


def test_counts_scale_with_the_budget_and_the_token_count():
    method, ctx = SparseVLM(), SimpleNamespace(budget=85, target=85)  # 33.2 % of 256: the 192 list
    assert [method.count(ctx, t, 256, torch.rand(2, 256)) for t in range(3)] == [133, 89, 49]
    ctx = SimpleNamespace(budget=28, target=28)  # 10.9 % of 256: the 64 list
    assert [method.count(ctx, t, 256, torch.rand(2, 256)) for t in range(3)] == [29, 13, 7]
    assert method.count(SimpleNamespace(budget=256, target=256), 2, 256, torch.rand(2, 100)) == 100  # every token
    assert method.count(SimpleNamespace(budget=85, target=40), 1, 256, torch.rand(2, 100)) == 85  # a per-point schedule


def test_later_points_use_the_first_points_budget():
    """At 28 of 256 tokens the third point keeps the 64 list's 17 scaled, 7, though the runtime
    caps the budget it hands that point at the 14 tokens still there."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(1, 14, 8, generator=g)
    attention = [torch.rand(2, 14, generator=g)]
    ctx = context(tokens, attention, 14, layer=16, n0=256, raters=torch.tensor([0, 1]))
    for s in ctx.state.images:
        s["budget"] = 28
    sel = SparseVLM(recycle=False).select(ctx)
    assert sel.counts() == [7]


def test_v1_rank_rule():
    """v1.0: keep min(int(rank * scale + bias), n - 1), nothing pruned at full rank."""
    g = torch.Generator().manual_seed(3)
    low = torch.rand(4, 2, generator=g) @ torch.rand(2, 40, generator=g)  # rank 2
    ctx = SimpleNamespace(budget=128, target=128)
    assert SparseVLM(version="1.0", scale=3.0, bias=1.0).count(ctx, 0, 576, low) == 7
    assert SparseVLM(version="1.0").count(ctx, 0, 576, low) == (2 * 9 + 6)  # POPE's 128-token rule
    assert SparseVLM(version="1.0").count(SimpleNamespace(budget=192, target=192), 0, 576, low) == 27  # 13.5 * 2
    assert SparseVLM(version="1.0", scale=20.0, bias=0.0).count(ctx, 0, 576, low) == 39  # n - 1
    full = torch.rand(6, 6, generator=g)
    assert SparseVLM(version="1.0").count(ctx, 0, 576, full) == 6
    assert [p.layer for p in SparseVLM(version="1.0").points(SimpleNamespace(llm_layers=32))] == [3, 7, 16, 20]
    assert [p.layer for p in SparseVLM().points(SimpleNamespace(llm_layers=4))] == [1, 2, 3]


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="option 'version' of method 'sparsevlm'.*'1.5'"):
        SparseVLM(version="3")
    with pytest.raises(ValueError, match="'scale' and 'bias' of method 'sparsevlm' apply to version '1.0' only"):
        SparseVLM(scale=2.0)


def _attention_probs(layer, hidden, cos, sin, heads, kv_heads):
    """Head-wise causal attention probabilities of ``layer`` on ``hidden`` [1, L, C], by hand."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    d = attn.head_dim
    q = attn.q_proj(x).view(1, -1, heads, d).transpose(1, 2)
    k = attn.k_proj(x).view(1, -1, kv_heads, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(heads // kv_heads, 1)
    logits = q @ k.transpose(-1, -2) / d**0.5
    n = hidden.shape[1]
    logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return logits.softmax(-1)[0]


def _run(layers, hidden, lm, pos=None):
    n = hidden.shape[1]
    pos = torch.arange(n)[None] if pos is None else pos
    cos, sin = lm.rotary_emb(hidden, position_ids=pos)
    mask = torch.zeros(1, 1, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos)
    return hidden


def test_one_pruning_layer_by_hand_on_tiny_llava():
    """One point before layer 2 of the tiny LLaVA (budget 85 of 256: 133 kept, 37 recycled
    into 4 means) equals the code's steps by hand: raters from the LM input, layer 1's
    rater -> image attention, top 133, DPC-KNN means in the centres' places, positions
    renumbered, layers 2 and 3 on the shortened sequence."""
    model = tiny_llava(attn="eager")
    inputs = batch([[10, 11, 12, 13, 14, 15]], seed=4)
    with torch.no_grad():
        with vlmprune.wrap(model, "sparsevlm", budget=85, layers=(2,), layers_of=0):
            pruned = model(**inputs).logits[0]
        lm = model.model.language_model
        cfg = lm.config
        embeds = full_embeddings(model, inputs)
        ids = inputs["input_ids"][0]
        visual = (ids == IMAGE_TOKEN).nonzero().flatten()
        text = torch.arange(int(visual[-1]) + 1, ids.shape[0])
        raters = raters_by_hand(embeds[0, visual], embeds[0, text])
        hidden = _run(lm.layers[:1], embeds, lm)
        cos, sin = lm.rotary_emb(hidden, position_ids=torch.arange(ids.shape[0])[None])
        probs = _attention_probs(lm.layers[1], hidden, cos, sin, cfg.num_attention_heads, cfg.num_key_value_heads)
        hidden = _run(lm.layers[:2], embeds, lm)[0]
        scores = probs.mean(0)[text[raters]][:, visual].mean(0)
        order = scores.argsort(descending=True)
        kept, deleted = order[:133], order[133:]
        recycled = deleted[: int(deleted.numel() * 0.3) + 1]
        assert recycled.numel() == 37
        centres, _, means = dpc_by_hand(hidden[visual[recycled]], 4)
        row = hidden.clone()
        row[visual[recycled[centres]]] = means
        drop = torch.ones(ids.shape[0], dtype=torch.bool)
        drop[visual] = False
        drop[visual[kept]] = True
        drop[visual[recycled[centres]]] = True
        ref = model.lm_head(lm.norm(_run(lm.layers[2:], row[drop][None], lm)))[0]
    assert pruned.shape[0] == ids.shape[0] - 256 + 137
    torch.testing.assert_close(pruned, ref, atol=1e-5, rtol=1e-5)


def test_v2_one_pruning_layer_by_hand_on_tiny_llava():
    """Version 2.0 (the code's USE_VERSION=2_0) before layer 2: layer 1's probabilities divided
    by the RoPE-only logit of all-ones q/k, ``2 sum_k cos(theta_k (i - j)) / sqrt(d)``, the mean
    over the 2 (= 14 * 4 / 32) heads with the largest rater -> image sum, top 133, no
    recycling, original position ids."""
    model = tiny_llava(attn="eager")
    inputs = batch([[10, 11, 12, 13, 14, 15]], seed=5)
    with torch.no_grad():
        with vlmprune.wrap(model, "sparsevlm", budget=85, layers=(2,), layers_of=0, version="2.0") as handle:
            pruned = model(**inputs).logits[0]
        assert handle.method.llm_positions == "original"
        lm = model.model.language_model
        cfg = lm.config
        embeds = full_embeddings(model, inputs)
        ids = inputs["input_ids"][0]
        length = ids.shape[0]
        visual = (ids == IMAGE_TOKEN).nonzero().flatten()
        text = torch.arange(int(visual[-1]) + 1, length)
        raters = text[raters_by_hand(embeds[0, visual], embeds[0, text])]
        hidden = _run(lm.layers[:1], embeds, lm)
        cos, sin = lm.rotary_emb(hidden, position_ids=torch.arange(length)[None])
        probs = _attention_probs(lm.layers[1], hidden, cos, sin, cfg.num_attention_heads, cfg.num_key_value_heads)
        delta = (raters[:, None] - visual[None, :]).float()
        gravity = 2 * torch.cos(delta[..., None] * lm.rotary_emb.inv_freq).sum(-1) / lm.layers[1].self_attn.head_dim**0.5
        corrected = probs[:, raters][:, :, visual] / gravity
        heads = corrected.sum((1, 2)).topk(2).indices
        scores = corrected[heads].mean(0).mean(0)
        kept = scores.topk(133).indices
        hidden = _run(lm.layers[:2], embeds, lm)
        keep = torch.ones(length, dtype=torch.bool)
        keep[visual] = False
        keep[visual[kept]] = True
        positions = torch.arange(length)[keep][None]
        ref = model.lm_head(lm.norm(_run(lm.layers[2:], hidden[:, keep], lm, positions)))[0]
    assert pruned.shape[0] == length - 256 + 133
    torch.testing.assert_close(pruned, ref, atol=1e-5, rtol=1e-5)
