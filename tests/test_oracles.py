"""Oracles that depend on *which* signal a method reads (issue #12, test strength).

Each test wraps one eager tiny LLaVA (sharpened attention, see ``oracle_signals``) and compares
the scores a method records (``Selection.scores`` via ``handle.record()``) or the tokens it keeps
with references computed from the model's own ``output_attentions``, hidden states and modules at
the layer, query and feature the method card names, and checks that the references at the other
layers (queries, features) differ, so a method reading the wrong one fails. Options that other
work may retune (layers, ratios, strides) are passed explicitly, scaled to the 4-layer model.
"""

from __future__ import annotations

import pytest
import torch

import vlmprune
from vlmprune.primitives.selection import (
    greedy_k_center,
    max_min_diversity,
    topk_keep_order,
)
from vlmprune.registry import get_method

from .oracle_signals import TEXT, assert_only_at, last_row, reference, vision_v
from .tiny import IMAGE_TOKEN

N = 256
FEATURE = 2  # the tiny CLIP's feature layer: vision_feature_layer=-2 of 4 layers


@pytest.fixture(scope="module")
def ref():
    return reference()


def run(ref, method, budget, output_attentions=False, **options):
    """The records of one wrapped forward (and its output)."""
    with vlmprune.wrap(ref.model, method, budget=budget, **options) as handle, handle.record() as records:
        with torch.no_grad():
            out = ref.model(**ref.inputs, output_attentions=output_attentions)
        stats = handle.stats
    return records, out, stats


def kept(record) -> torch.Tensor:
    return record.token_index[0, record.selection.keep[0]]


def received(attn: torch.Tensor, reduce: str) -> torch.Tensor:
    """Attention each patch receives, head mean, over all query rows (CLS column dropped)."""
    per_key = attn.mean(1)
    per_key = per_key.sum(1) if reduce == "sum" else per_key.mean(1)
    return per_key[:, 1:]


# -- LLM stage -------------------------------------------------------------------------------------
def test_fastv_reads_layer_k_minus_1_last_token(ref):
    """FastV card: ranks by the head-mean attention of the last prompt token at layer K-1 (K = 3
    here, not the default 2 that other tests use)."""
    k_layer = 3
    records, _, _ = run(ref, "fastv", 40, k_layer=k_layer)
    refs = {layer: last_row(a, ref.img) for layer, a in enumerate(ref.llm_attn)}
    assert_only_at(records[0].selection.scores, refs, k_layer - 1)
    assert kept(records[0]).tolist() == topk_keep_order(refs[k_layer - 1], 40)[0].tolist()


def test_adatoken3d_reads_the_next_layer_and_rounds_its_schedule(ref):
    """AdaToken-3D card: after layer p (1-based) the *next* layer's (0-based p) q/k on the
    current hidden states rank by the last token's attention. Ratios 0.3 / 0.1 with a budget of
    0.1 of 256 (25.6 -> 26): first point int(0.3 * 26 / 0.1) = 78, then 26."""
    records, _, stats = run(ref, "adatoken3d", 0.1, layers=(1, 3), layers_of=0, ratios=(0.3, 0.1))
    refs = {layer: last_row(a, ref.img) for layer, a in enumerate(ref.llm_attn)}
    assert_only_at(records[0].selection.scores, refs, 1)
    assert [p["out"] for p in stats["points"]] == [[78], [26]]
    assert kept(records[0]).tolist() == topk_keep_order(refs[1], 78)[0].tolist()


def test_atp_self_and_cross_scores_with_asymmetric_weight(ref):
    """ATP card (training-free): S_cross = last token -> image attention, S_self = column means of
    the image -> image block, both at layer K-1 and head-averaged, each normalised to sum 1;
    S_red = w * S_self + (1 - w) * S_cross (w = 0.3 here, so swapping the two fails)."""
    records, _, _ = run(ref, "atp", 64, layers=(2, 3), layers_of=0, mass=(0.9, 0.8), sap_strides=(0, 0), self_weight=0.3)

    def red(attn, w):
        cross = last_row(attn, ref.img)
        self_ = attn[:, :, ref.img][:, :, :, ref.img].mean(1).mean(1)
        return w * self_ / self_.sum() + (1 - w) * cross / cross.sum()

    refs = {(layer, w): red(a, w) for layer, a in enumerate(ref.llm_attn) for w in (0.3, 0.7)}
    assert records[0].point.layer == 2
    assert_only_at(records[0].selection.scores, refs, (1, 0.3))


def _no_rope_last_row(ref, layer: int) -> torch.Tensor:
    """Softmax over the image keys of the last token's q.k without rotary embeddings, per head,
    then the head mean (FEATHER's criterion), from decoder layer ``layer``'s own projections."""
    attn = ref.model.model.language_model.layers[layer].self_attn
    x = ref.model.model.language_model.layers[layer].input_layernorm(ref.llm_hidden[layer])
    d = attn.head_dim
    q = attn.q_proj(x).view(1, -1, 4, d)[:, -1]  # [1, H, D]
    k = attn.k_proj(x).view(1, -1, 2, d)[:, ref.img].repeat_interleave(2, 2)  # [1, N, H, D]
    logits = torch.einsum("bhd,bnhd->bhn", q, k) * d**-0.5
    return logits.softmax(-1).mean(1)


@pytest.mark.parametrize("criterion", ["no_rope", "rope"])
def test_feather_criterion_at_layer_k_minus_1(ref, criterion):
    """FEATHER card: the last token's attention at layer K-1, per head renormalised over the image
    keys, head mean; without RoPE (FEATHER) or with it (FastV's criterion)."""
    records, _, _ = run(ref, "feather", 64, layers=(2, 3), layers_of=0, stride=0, criterion=criterion)
    if criterion == "rope":
        def crit(a):
            p = a[:, :, -1, ref.img]
            return (p / p.sum(-1, keepdim=True)).mean(1)

        refs = {layer: crit(a) for layer, a in enumerate(ref.llm_attn)}
    else:
        refs = {layer: _no_rope_last_row(ref, layer) for layer in range(4)}
        rope = ref.llm_attn[1][:, :, -1, ref.img]
        refs["rope"] = (rope / rope.sum(-1, keepdim=True)).mean(1)
    assert_only_at(records[0].selection.scores, refs, 1)


@pytest.mark.parametrize("query", ["last", "instruction"])
def test_todre_stage2_reads_layer_k2_minus_1_of_the_pruned_sequence(ref, query):
    """ToDRE card, stage 2: the text's attention to the surviving image tokens at layer K2-1
    (K2 = 2 here), on the sequence stage 1 left (BOS, 64 image tokens, the text); keeps
    round(0.3 * 64) = 19 (a fraction that does not divide)."""
    records, out, stats = run(
        ref, "todre", 64, output_attentions=True, stage2="relevance", stage2_layer=2, stage2_layer_of=0,
        stage2_query=query, stage2_keep=0.3, features="projected", seed_token="first", diversity="kcenter",
    )
    assert [p["out"] for p in stats["points"]] == [[64], [19]]
    img = torch.arange(1, 65)
    rows = {"last": [-1], "instruction": list(range(65, 70))}
    refs = {
        (layer, q): out.attentions[layer][:, :, rows[q]][:, :, :, img].mean(1).mean(1)
        for layer in (0, 1) for q in rows
    }
    assert_only_at(records[1].selection.scores, refs, (1, query))


def test_transprune_iga_from_the_next_layer_instruction_rows(ref):
    """TransPrune card: IGA = the text after the image attending to the image at the *next* layer
    (0-based K), head and row means, normalised to sum 1. ``alpha=0`` leaves IGA alone."""
    records, _, _ = run(ref, "transprune", 128, layers=(1, 3), layers_of=0, ratios=(0.75, 0.5), alpha=0.0)

    def iga(a, rows):
        g = a[:, :, rows][:, :, :, ref.img].mean(1).mean(1)
        return g / g.sum()

    refs = {(layer, "instruction"): iga(a, ref.text) for layer, a in enumerate(ref.llm_attn)}
    refs[(1, "last")] = iga(ref.llm_attn[1], [-1])
    assert_only_at(records[0].selection.scores, refs, (1, "instruction"))


# -- before the LLM: vision attention --------------------------------------------------------------
def test_visionzip_dominant_by_head_summed_cls_attention_at_the_feature_layer(ref):
    """VisionZip card: CLS attention summed over heads at CLIP layer -2 ranks the dominant tokens."""
    records, _, _ = run(ref, "visionzip", 64)
    refs = {(layer, r): a[:, :, 0, 1:].sum(1) if r == "sum" else a[:, :, 0, 1:].mean(1)
            for layer, a in enumerate(ref.vis_attn) for r in ("sum", "mean")}
    assert_only_at(records[0].selection.scores, refs, (FEATURE, "sum"))
    n_dom = 64 - 1 - round(64 * 10 / 64)  # 53 dominant, 10 contextual, CLS
    assert set(topk_keep_order(refs[(FEATURE, "sum")], n_dom)[0].tolist()) <= set(kept(records[0]).tolist())


@pytest.mark.parametrize("significance, layer, at", [("received", 0, FEATURE), ("cls", 2, 1)])
def test_fopru_significance_layer(ref, significance, layer, at):
    """FoPru card: significance = attention received from all query rows (head mean, summed over
    rows) or the CLS row, at the 1-indexed vision layer (0: the feature layer)."""
    records, _, _ = run(ref, "fopru", 64, significance=significance, layer=layer, strategy="rank")
    refs = {}
    for lay, a in enumerate(ref.vis_attn):
        refs[(lay, "received")] = received(a, "sum")
        refs[(lay, "cls")] = a[:, :, 0, 1:].mean(1)
    assert_only_at(records[0].selection.scores, refs, (at, significance))


def test_hiprune_anchors_from_the_object_layer_registers_from_the_deep_layer(ref):
    """HiPrune card: anchors = top alpha/5 share of the budget by received attention at the object
    layer; the rest by received attention at the deep layer (the feature layer)."""
    budget, alpha = 64, 0.4
    records, _, _ = run(ref, "hiprune", budget, object_layer=2, layer_rule="absolute", deep_layer=0, alpha=alpha)
    priority = records[0].selection.scores
    chosen = priority >= 2.0
    refs = {layer: received(a, "mean") for layer, a in enumerate(ref.vis_attn)}
    assert_only_at(priority - 2.0 * chosen, refs, FEATURE)
    n_anchor = round(budget * alpha / 5)  # 5
    anchors = {layer: set(torch.topk(g[0], n_anchor).indices.tolist()) for layer, g in refs.items()}
    on = set(chosen[0].nonzero().flatten().tolist())
    assert anchors[1] <= on  # object_layer=2, 1-indexed
    assert all(not anchors[layer] <= on for layer in (0, 2, 3))


def test_holov_ranks_inside_each_crop_by_cls_attention_at_the_feature_layer(ref):
    """HoloV card (code mode): inside each of the contiguous raster crops the kept tokens are the
    most CLS-attended (head mean, feature layer)."""
    records, _, _ = run(ref, "holov", 64, mode="code", crops=8, layout="1d", overflow="redistribute", saliency="cls")
    keep = set(kept(records[0]).tolist())
    refs = {layer: a[0, :, 0, 1:].mean(0) for layer, a in enumerate(ref.vis_attn)}

    def consistent(sal):
        for c in range(8):
            crop = torch.arange(32 * c, 32 * (c + 1))
            k = sum(int(i) in keep for i in crop)
            if set(crop[sal[crop].topk(k).indices].tolist()) != {i for i in crop.tolist() if i in keep}:
                return False
        return True

    assert consistent(refs[FEATURE])
    assert not any(consistent(refs[layer]) for layer in (0, 1, 3))


def test_prumerge_plus_cls_attention_from_the_last_layer_with_heads_joined(ref):
    """PruMerge card: CLS attention from the last CLIP layer's q_proj / k_proj outputs (input:
    hidden_states[-2]), heads not split: softmax(q_cls . k / sqrt(C))."""
    records, _, _ = run(ref, "prumerge_plus", 64)

    def cls_attn(layer):
        block = ref.model.model.vision_tower.encoder.layers[layer]
        x = block.layer_norm1(ref.vis_hidden[layer])
        q, k = block.self_attn.q_proj(x), block.self_attn.k_proj(x)
        return (q[:, :1] @ k.transpose(1, 2) * q.shape[-1] ** -0.5).softmax(-1)[:, 0, 1:]

    refs = {layer: cls_attn(layer) for layer in range(4)}
    assert_only_at(records[0].selection.scores, refs, FEATURE + 1)


def test_vflowopt_importance_from_the_feature_layer(ref):
    """VFlowOpt card: the global tokens are those whose received attention (head mean, mean over
    rows) exceeds t times its mean; importance = the attention the global tokens pay, at the
    vision layer feeding the projector (official k_v = the feature layer)."""
    t = 1.5
    records, _, _ = run(ref, "vflowopt", 0.5, t=t, r_v=0.5, r_1=1.0, m=2.0, cell_reference=0, recycle=False)

    def importance(attn):
        a = attn.mean(1)[0]
        rho = a.mean(0)
        glob = rho > t * rho.mean()
        assert glob.any()
        return a[glob].mean(0)[1:][None]

    refs = {layer: importance(a) for layer, a in enumerate(ref.vis_attn)}
    assert records[0].point.stage == "projector"
    assert_only_at(records[0].selection.scores, refs, FEATURE)


def test_flowcut_ema_over_encoder_layers(ref):
    """FlowCut card: the flow score of each encoder layer before the pruning point (CLS relay:
    relation = head-mean CLS attention, value L1 norms, value-space CLS similarity) is carried
    as ``score = ema * previous + (1 - ema) * current``. On the tiny CLIP (feature layer 2,
    interval 2) the only point is before layer 2: ``ema * s_0 + (1 - ema) * s_1``; ema = 0.25, so
    swapped weights (0.75) fail."""
    ema = 0.25
    records, _, _ = run(ref, "flowcut", 32, ema=ema, interval=2, relay="cls", llm_stage="off")

    def layer_score(layer):
        v = vision_v(ref, layer)
        relation = ref.vis_attn[layer][:, :, 0, 1:].mean(1)
        semantic = (v[:, :, :1] @ v.transpose(2, 3)).softmax(-1)[:, :, 0, 1:].mean(1)
        value_l1 = v[:, :, 1:].mean(1).abs().sum(-1)
        return (relation / relation.sum() + semantic / semantic.sum()) * value_l1

    s0, s1 = layer_score(0), layer_score(1)
    refs = {e: e * s0 + (1 - e) * s1 for e in (0.25, 0.75)}
    assert records[0].point == vlmprune.context.Point("encoder", 2)
    assert_only_at(records[0].selection.scores, refs, ema)


# -- before the LLM: features ----------------------------------------------------------------------
def test_divprune_diversity_on_projected_features(ref):
    """DivPrune card: max-min diversity on the *projected* tokens (the LLM's inputs)."""
    records, _, _ = run(ref, "divprune", 0.3)
    on_projected = max_min_diversity(ref.projected, 77)[0]  # round(0.3 * 256) = 77
    assert kept(records[0]).tolist() == on_projected.tolist()
    assert on_projected.tolist() != max_min_diversity(ref.feats, 77)[0].tolist()


@pytest.mark.parametrize("features", ["projected", "vision"])
def test_todre_stage1_features(ref, features):
    """ToDRE card, stage 1: greedy k-center over the features after the projector (default) or
    the vision features, as the option says."""
    records, _, _ = run(ref, "todre", 57, stage2="none", features=features, seed_token="first", diversity="kcenter", metric="cosine")
    first = torch.zeros(1, dtype=torch.long)
    refs = {name: greedy_k_center(x, 57, metric="cosine", first=first)[0].tolist()
            for name, x in (("projected", ref.projected), ("vision", ref.feats))}
    assert refs["projected"] != refs["vision"]
    assert kept(records[0]).tolist() == refs[features]


def test_covipal_scores_are_the_ppm_on_projected_tokens_and_the_prompt_embeddings(ref):
    """CoViPAL card: the plug-and-play module scores the *projected* visual tokens against the
    prompt's text embeddings (the LLM's input embeddings of every non-image token)."""
    from vlmprune.methods.covipal import PPM

    ppm = PPM(64, width=32, heads=2, seed=0)
    records, _, _ = run(ref, "covipal", 57, weights=ppm)
    ids = ref.inputs["input_ids"][0]
    text = ref.model.get_input_embeddings()(ids[ids != IMAGE_TOKEN])[None]
    mask = torch.ones(text.shape[:2], dtype=torch.bool)
    with torch.no_grad():
        refs = {
            "projected": ppm(ref.projected, text, mask),
            "last layer projected": ppm(ref.model.model.multi_modal_projector(ref.vis_hidden[-1][:, 1:]), text, mask),
            "text after the image": ppm(ref.projected, text[:, 1:], mask[:, 1:]),
        }
    assert_only_at(records[0].selection.scores, refs, "projected", atol=1e-5)
    assert kept(records[0]).tolist() == topk_keep_order(refs["projected"], 57)[0].tolist()


def test_zoo_prune_sensitivity_of_the_projector_at_the_pre_projector_features(ref):
    """ZOO-Prune card: s_i = mean_j ||P(f_i + h u_j) - P(f_i - h u_j)|| / (2h) at the vision
    features *before* the projector (unit Gaussian directions from the seed), min-max normalised."""
    m, h = 8, 0.05
    records, _, _ = run(ref, "zoo_prune", 57, m=m, h=h, precision="fp32")
    u = torch.randn(m, 32, generator=torch.Generator().manual_seed(0))
    u = u / u.norm(dim=-1, keepdim=True)
    proj = ref.model.model.multi_modal_projector

    def sensitivity(f):
        with torch.no_grad():
            s = torch.stack([(proj(f + h * d) - proj(f - h * d)).norm(dim=-1) for d in u]).mean(0) / (2 * h)
        return (s - s.min()) / (s.max() - s.min())

    refs = {layer: sensitivity(ref.vis_hidden[layer][:, 1:]) for layer in (2, 3, 4)}  # 3: the features (-2)
    assert_only_at(records[0].selection.scores, refs, 3, atol=1e-4)


# -- budgets that do not divide ----------------------------------------------------------------------
#: budget -> tokens kept under the method's fraction rounding ("round": max(1, round(256 f)),
#: "floor": max(1, int(256 f)), the official int(n * ratio) of some methods)
COUNTS = {0.3: {"round": 77, "floor": 76}, 57: {"round": 57, "floor": 57}, 0.07: {"round": 18, "floor": 17}}


@pytest.mark.parametrize(  # counts the other tests here do not already pin at such a budget
    "method, budget, options",
    [("random", 0.07, {}), ("uniform", 0.3, {}), ("visionzip", 57, {}), ("hiprune", 0.07, {}),
     ("holov", 0.3, {"crops": 8, "overflow": "redistribute"})],
)
def test_projector_methods_keep_the_exact_rounded_count(ref, method, budget, options):
    """A fraction of 256 that is no whole count (76.8, 17.92) becomes the method's rounding of it;
    an int that is no multiple of the grid or the crops keeps exactly itself: the LLM sees that
    many visual tokens."""
    _, _, stats = run(ref, method, budget, **options)
    assert stats["llm_visual_tokens"] == [COUNTS[budget][get_method(method).fraction_rounding]]


def test_uniform_covers_every_block_of_the_grid(ref):
    """Uniform sampling at a count that is no square: every 4 x 4 block of the 16 x 16 grid holds
    between 2 and 9 of the 57 kept tokens (3.6 on average), so none is left empty or crowded."""
    k = 57
    records, _, _ = run(ref, "uniform", k)
    raster = kept(records[0])
    per_block = torch.bincount((raster // 16 // 4) * 4 + (raster % 16) // 4, minlength=16)
    assert per_block.min() >= 2 and per_block.max() <= 9 and per_block.sum() == k


def test_fixed_keeps_its_raster_indices_at_an_llm_layer(ref):
    """``fixed`` at LLM layer 3 with 57 indices: the kept tokens are exactly those raster indices;
    layers 0-2 see all 262 tokens, layer 3 sees 262 - 199."""
    indices = tuple(range(3, 256, 4))[:57]
    records, out, _ = run(ref, "fixed", 57, output_attentions=True, indices=indices, stage="llm", layer=3)
    assert kept(records[0]).tolist() == list(indices)
    assert [a.shape[-1] for a in out.attentions] == [262, 262, 262, 63]


def test_visionzip_contextual_merge_by_head_mean_keys_aligned_to_patches(ref):
    """VisionZip card: the tokens left after the dominant ones go to every (R // Cn)-th of them by
    cosine similarity of the feature layer's head-mean keys (CLS key dropped, so key i is patch
    i's); merge_map gives each token's kept slot. Keys of another layer, keys shifted by the CLS
    row, or the features themselves give other assignments."""
    budget, n_ctx = 64, 10
    n_dom = budget - n_ctx - 1
    records, _, _ = run(ref, "visionzip", budget)
    dominant = topk_keep_order(ref.vis_attn[FEATURE][:, :, 0, 1:].sum(1), n_dom)[0]
    rest = torch.ones(N, dtype=torch.bool)
    rest[dominant] = False
    remaining = rest.nonzero().flatten()
    targets = remaining[:: len(remaining) // n_ctx][:n_ctx]
    others = remaining[~torch.isin(remaining, targets)]

    def head_mean_keys(layer):
        block = ref.model.model.vision_tower.encoder.layers[layer]
        k = block.self_attn.k_proj(block.layer_norm1(ref.vis_hidden[layer]))
        return k.view(1, k.shape[1], block.self_attn.num_heads, -1).mean(2)[0]  # [1 + N, D]

    def merge_map(metric):
        m = torch.nn.functional.normalize(metric, dim=-1)
        out = torch.full((N,), -1, dtype=torch.long)
        out[dominant] = torch.arange(n_dom)
        out[targets] = n_dom + torch.arange(n_ctx)
        out[others] = n_dom + (m[others] @ m[targets].T).argmax(-1)
        return out

    with torch.no_grad():
        refs = {layer: merge_map(head_mean_keys(layer)[1:]) for layer in range(4)}
        refs["cls not dropped"] = merge_map(head_mean_keys(FEATURE)[:-1])
        refs["features"] = merge_map(ref.feats[0])
    got = records[0].selection.merge_map[0]
    assert torch.equal(got, refs[FEATURE])
    assert all(not torch.equal(refs[FEATURE], r) for key, r in refs.items() if key != FEATURE)


def test_transprune_ttv_taps_and_asymmetric_alpha(ref):
    """TransPrune card: a band layer's transition weight, per sub-layer (attention, MLP), is
    ``||x_out|| / ||x_in|| * softmax_seq(1 - cos(x_in, x_out))`` with ``x_in`` the *normalised*
    sub-layer input and ``x_out`` its output before the residual add; at the first point (K = 1)
    only layer 0 has run. Score = alpha * TTV + (1 - alpha) * IGA, both normalised over the image
    tokens; alpha = 0.3 so that swapping the weights fails, and taps before the norm or after the
    residual fail too."""
    taps = {}
    layer = ref.model.model.language_model.layers[0]

    def on_attn(module, args, kwargs, out):
        taps["attn"] = (kwargs.get("hidden_states", args[0] if args else None), out[0])

    def on_mlp(module, args, out):
        taps["mlp"] = (args[0], out)

    hooks = [layer.self_attn.register_forward_hook(on_attn, with_kwargs=True), layer.mlp.register_forward_hook(on_mlp)]
    try:
        with torch.no_grad():
            ref.model(**ref.inputs)
    finally:
        for hook in hooks:
            hook.remove()
    records, _, _ = run(ref, "transprune", 128, layers=(1, 3), layers_of=0, ratios=(0.75, 0.5), alpha=0.3, direction="signed")

    def weight(x_in, x_out, signed=True):
        cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)
        change = 1 - cos if signed else 1 - cos.abs()
        return (x_out.norm(dim=-1) / x_in.norm(dim=-1) * change.softmax(-1))[:, ref.img]

    def norm(x):
        return x / x.sum()

    (a_in, a_out), (m_in, m_out) = taps["attn"], taps["mlp"]
    h0 = ref.llm_hidden[0]
    h_mid = h0 + a_out
    iga = norm(ref.llm_attn[1][:, :, ref.text][:, :, :, ref.img].mean(1).mean(1))
    ttv = {
        "card": norm(weight(a_in, a_out) + weight(m_in, m_out)),
        "abs": norm(weight(a_in, a_out, False) + weight(m_in, m_out, False)),
        "before the norm": norm(weight(h0, a_out) + weight(h_mid, m_out)),
        "after the residual": norm(weight(a_in, h_mid) + weight(m_in, ref.llm_hidden[1])),
    }
    refs = {(key, alpha): alpha * t + (1 - alpha) * iga for key, t in ttv.items() for alpha in (0.3, 0.7)}
    assert_only_at(records[0].selection.scores, refs, ("card", 0.3))


def test_flowcut_llm_stage_relays_through_the_last_token_at_layer_k_minus_1(ref):
    """FlowCut card, LLM stage (after decoder layer index 1): with the last prompt token as relay,
    rel = head-mean softmax over the image keys of q_last . k / sqrt(d) (post-RoPE), sem = the same
    with values, score = (rel / sum + sem / sum) * ||head-mean v||_1; on the sequence the encoder
    stage left (BOS, 2 x 16 image tokens, the text)."""
    model = ref.model
    options = {"llm_stage": "on", "llm_layer": 2, "encoder_keep": 2.0, "ema": 0.5}
    with vlmprune.wrap(model, "flowcut", budget=16, **options) as handle, handle.record() as records, torch.no_grad():
        out = model(**ref.inputs, output_attentions=True, output_hidden_states=True)
    assert [str(r.point) for r in records] == ["encoder:2", "llm:2"]
    img = torch.arange(1, 33)

    def score(layer):
        attn = model.model.language_model.layers[layer].self_attn
        x = model.model.language_model.layers[layer].input_layernorm(out.hidden_states[layer])
        v = attn.v_proj(x).view(1, x.shape[1], 2, -1).transpose(1, 2)  # [1, kv heads, L, D]
        rel = out.attentions[layer][:, :, -1, img]
        rel = (rel / rel.sum(-1, keepdim=True)).mean(1)
        sem = ((v[:, :, -1:] @ v[:, :, img].transpose(2, 3)) * v.shape[-1] ** -0.5).softmax(-1)[:, :, 0].mean(1)
        return (rel / rel.sum() + sem / sem.sum()) * v[:, :, img].mean(1).abs().sum(-1)

    with torch.no_grad():
        refs = {layer: score(layer) for layer in (0, 1)}  # layers 2, 3 run on the pruned sequence
    assert_only_at(records[1].selection.scores, refs, 1, atol=1e-5)


def test_fastv_on_qwen2_vl_matches_the_eager_attention_with_m_rope():
    """FastV on tiny Qwen2-VL (3-D M-RoPE, grouped KV heads, left padding in a batch of two): the
    recorded scores are the eager model's own last-token attention at layer K-1 for each image."""
    from .tiny import QWEN_IMAGE, qwen_batch, tiny_qwen

    model = tiny_qwen("2", "eager")
    inputs = qwen_batch([TEXT, TEXT[:2]], [(8, 8), (8, 8)], seed=1)
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions
    with vlmprune.wrap(model, "fastv", budget=5, k_layer=2) as handle, handle.record() as records, torch.no_grad():
        model(**inputs)
    img = inputs["input_ids"] == QWEN_IMAGE
    refs = {layer: torch.stack([a[i, :, -1, img[i]].mean(0) for i in range(2)]) for layer, a in enumerate(attn)}
    assert_only_at(records[0].selection.scores, refs, 1)
