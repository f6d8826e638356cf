"""Truth tests for encoder-stage pruning on Qwen2-VL / Qwen2.5-VL: whole 2x2 merge groups leave
between vision blocks; ``cu_seqlens`` (per frame), 2.5-VL's windows, the rotary embeddings,
the merger and the final window reordering follow the kept groups; the LLM sees fewer tokens
at their original 3-D M-RoPE positions.

The by-hand reference (:func:`visual_by_hand`) runs the unwrapped tower's own modules block by
block on the kept patches with cu_seqlens and windows computed here from the image grid."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import vlmprune
from tests.cases import QWEN, gather_left_padded, run_qwen_layers

# the conformance case's forward, greedy generate (4 new tokens) and no-cache loop (any Qwen-VL model)
forward, generate, no_cache_loop = QWEN[0].forward, QWEN[0].generate, QWEN[0].no_cache
from tests.tiny import QWEN_IMAGE, qwen_batch, qwen_prompt_with_images, tiny_qwen
from tests.truth import record_selections
from vlmprune.context import Point, Selection
from vlmprune.method import Method, option

TEXTS = [[10, 11, 12, 13], [20, 21]]
GRIDS = [(16, 16), (12, 20)]  # patches; merged 8x8 = 64 and 6x10 = 60 tokens
COUNTS = [64, 60]

# (version, encoder layers): "2.5-deep" is a 4-block Qwen2.5-VL tower with full attention in
# blocks 1 and 3 and 3x3-group windows (partial at the edges): layer 2 is before a window block
# (before the merger: layer = depth, 2 or 4)
CASES = [("2", (1,)), ("2.5", (1,)), ("2.5-deep", (2,)), ("2.5-deep", (1, 2)), ("2", (2,)), ("2.5-deep", (2, 4))]
case_ids = [f"{v}-L{'+'.join(map(str, layers))}" for v, layers in CASES]
cases = pytest.mark.parametrize("version,layers", CASES, ids=case_ids)


@dataclass
class TopNorm(Method):
    """Test method: keep the ``budget`` groups whose mean hidden state has the largest norm,
    before each vision block in ``layers`` (raster order kept). The by-hand reference applies
    the same rule to group means it computes itself."""

    name = "test_topnorm"
    stages = ("encoder",)
    needs = frozenset({"hidden"})
    positions = "original"

    layers: tuple = option((1,), "vision blocks to prune before")

    def points(self, info):
        return [Point("encoder", int(layer)) for layer in self.layers]

    def select(self, ctx):
        hidden = ctx.signals.hidden()
        assert torch.equal(hidden, ctx.tokens)
        keep = top_norm(hidden, ctx.budget)
        return Selection(keep=keep, scores=hidden.norm(dim=-1))


def top_norm(hidden: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(hidden.norm(dim=-1).topk(k, dim=-1).indices, dim=-1).values


_MODELS: dict = {}


def model_for(version: str):
    if version not in _MODELS:
        if version == "2.5-deep":
            config = tiny_qwen("2.5").config
            config.vision_config.depth = 4
            config.vision_config.fullatt_block_indexes = [1, 3]
            config.vision_config.window_size = 24  # 24 px / 4 px patches / 2 = 3x3 groups per window
            torch.manual_seed(1)
            model = type(tiny_qwen("2.5"))(config).eval()
            model.set_attn_implementation("sdpa")
            _MODELS[version] = model
        else:
            _MODELS[version] = tiny_qwen(version)
    return _MODELS[version]


def budget_for(layers, final):
    """Halve at the first of two points, then reach ``final``."""
    if len(layers) == 1:
        return final
    return {f"encoder:{layers[0]}": 0.5, f"encoder:{layers[1]}": final}


# -- the by-hand reference ------------------------------------------------------------------------
def visual_by_hand(model, pixels, grid, keep_at):
    """One image through the unwrapped tower, block by block: before block ``l`` in ``keep_at``
    only the groups whose raster ids ``keep_at[l](means, raster)`` returns stay (``means``
    ``[N, C]`` the group means in raster order); it may also return ``(kept, new_means)``, and
    every patch of a kept group is then shifted so the group's mean is ``new_means``. Returns (kept raster ids, merged tokens), both
    in raster order."""
    visual = model.model.visual
    m = visual.spatial_merge_size
    unit = m * m
    h, w = grid
    gh, gw = h // m, w // m
    x = visual.patch_embed(pixels)  # patches: 2x2 groups consecutive, groups in raster order

    def block_major(t):
        return t.reshape(gh, m, gw, m).permute(0, 2, 1, 3).flatten()

    hpos = torch.arange(h)[:, None].expand(h, w)
    wpos = torch.arange(w)[None, :].expand(h, w)
    cos, sin = visual.rotary_pos_emb(x, torch.stack([block_major(hpos), block_major(wpos)], -1))
    raster = torch.arange(gh * gw)
    windowed = hasattr(visual, "fullatt_block_indexes")
    if windowed:  # window order: windows in raster order, groups in raster order inside each
        ws = visual.window_size // m // visual.patch_size
        window = (raster // gw // ws) * (-(-gw // ws)) + (raster % gw) // ws
        order = torch.argsort(window * raster.numel() + raster)
    else:
        window = torch.zeros_like(raster)
        order = raster.clone()
    raster, window = raster[order], window[order]
    x, cos, sin = (t.view(-1, unit, t.shape[-1])[order] for t in (x, cos, sin))
    for layer in range(len(visual.blocks) + 1):  # layer = depth: before the merger
        if layer in keep_at:
            by_raster = torch.argsort(raster)
            kept = keep_at[layer](x.mean(1)[by_raster], raster[by_raster])
            kept, new_means = kept if isinstance(kept, tuple) else (kept, None)
            alive = torch.isin(raster, kept)
            raster, window, x, cos, sin = (t[alive] for t in (raster, window, x, cos, sin))
            if new_means is not None:  # new_means follow `kept`; x follows the window order
                where = (raster[:, None] == kept[None, :]).float().argmax(1)
                x = x + (new_means[where] - x.mean(1))[:, None]
        if layer == len(visual.blocks):
            break
        block = visual.blocks[layer]
        full = not windowed or layer in visual.fullatt_block_indexes
        _, sizes = torch.unique_consecutive(torch.zeros_like(window) if full else window, return_counts=True)
        cu = torch.nn.functional.pad((sizes * unit).cumsum(0), (1, 0)).to(torch.int32)
        flat = x.reshape(-1, x.shape[-1])
        out = block(flat, cu_seqlens=cu, position_embeddings=(cos.reshape(flat.shape[0], -1), sin.reshape(flat.shape[0], -1)))
        x = out.view(-1, unit, out.shape[-1])
    merged = visual.merger(x.reshape(-1, x.shape[-1]))
    by_raster = torch.argsort(raster)
    return raster[by_raster], merged[by_raster]


def prompt_by_hand(model, inputs, kept: list[torch.Tensor], feats: list[torch.Tensor]):
    """The prompt rows with only the kept image tokens (features ``feats[i]`` at raster ids
    ``kept[i]``), each at its original 3-D position; left padding. Returns logits and mask."""
    core = model.model
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pos, _ = core.get_rope_index(ids, image_grid_thw=inputs["image_grid_thw"], attention_mask=mask, mm_token_type_ids=inputs["mm_token_type_ids"])
    emb = core.get_input_embeddings()(ids)
    rows = []
    for i in range(ids.shape[0]):
        img = (ids[i] == QWEN_IMAGE).nonzero().flatten()
        emb[i, img[kept[i]]] = feats[i].to(emb.dtype)
        take = torch.ones(ids.shape[1], dtype=torch.bool)
        take[img] = False
        take[img[kept[i]]] = True
        rows.append(take.nonzero().flatten())
    embeds, new_mask, new_pos = gather_left_padded(rows, emb, mask, pos)
    return model(inputs_embeds=embeds, attention_mask=new_mask, position_ids=new_pos).logits, new_mask


def assert_real_tokens_close(pruned, ref, mask):
    """Both batches are left-padded: compare each row's real (unpadded) tokens."""
    for i in range(mask.shape[0]):
        n = int(mask[i].sum())
        torch.testing.assert_close(pruned[i, -n:], ref[i, -n:], atol=1e-5, rtol=1e-5)


def pixels_of(inputs, i):
    sizes = [int(t * h * w) for t, h, w in inputs["image_grid_thw"].tolist()]
    start = sum(sizes[:i])
    return inputs["pixel_values"][start : start + sizes[i]]


# 1. keep-all ------------------------------------------------------------------------------------
@cases
def test_keep_all_equivalence(version, layers):
    model = model_for(version)
    inputs = qwen_batch(TEXTS, GRIDS)
    ref, ref_tokens = forward(model, inputs), generate(model, inputs)
    with vlmprune.wrap(model, TopNorm(layers=layers), budget=1.0) as handle:
        torch.testing.assert_close(forward(model, inputs), ref, atol=1e-5, rtol=0)
        assert torch.equal(generate(model, inputs), ref_tokens)
    assert handle.stats["llm_visual_tokens"] == COUNTS
    with vlmprune.wrap(model, "fixed", stage="encoder", layer=layers[-1], indices=list(range(60)), budget=60) as handle:
        forward(model, inputs)
    assert handle.stats["llm_visual_tokens"] == [60, 60]


# 2. manual ------------------------------------------------------------------------------------------
@cases
def test_manual_equivalence(version, layers):
    """Pruned logits equal the by-hand tower (kept groups, rebuilt cu_seqlens / windows / rotary,
    merger) followed by the unwrapped LLM on the prompt without the dropped image tokens."""
    model = model_for(version)
    inputs = qwen_batch(TEXTS, GRIDS, seed=1)
    final = 0.25
    with vlmprune.wrap(model, TopNorm(layers=layers), budget=budget_for(layers, final)) as handle, record_selections(handle) as seen:
        pruned = forward(model, inputs)
    expected = [max(1, round(final * c)) for c in COUNTS]
    assert handle.stats["llm_visual_tokens"] == expected
    assert [rec[0] for rec in seen] == [Point("encoder", layer) for layer in layers for _ in GRIDS]
    kept, feats = [], []
    with torch.no_grad():
        for i, grid in enumerate(GRIDS):
            recorded = {rec[0].layer: rec[1][0, rec[2].keep[0]] for rec in seen if rec.images == (i,)}
            counts = dict(zip(layers, [max(1, round(0.5 * COUNTS[i])), expected[i]] if len(layers) == 2 else [expected[i]]))

            def keep_at(means, raster, layer, recorded=recorded, counts=counts):
                chosen = raster[top_norm(means[None], counts[layer])[0]]
                torch.testing.assert_close(chosen, recorded[layer], atol=0, rtol=0)
                return chosen

            r, f = visual_by_hand(model, pixels_of(inputs, i), grid, {layer: (lambda m, r, layer=layer: keep_at(m, r, layer)) for layer in layers})
            kept.append(r)
            feats.append(f)
        ref, mask = prompt_by_hand(model, inputs, kept, feats)
    assert_real_tokens_close(pruned, ref, mask)


def test_manual_fixed_groups_across_windows():
    """A fixed, scattered set of groups (every window of the 2.5-VL tower partly emptied, some
    windows emptied completely) before a window block equals the by-hand tower."""
    model = model_for("2.5-deep")
    inputs = qwen_batch(TEXTS, GRIDS, seed=5)
    picks = [sorted(torch.randperm(c, generator=torch.Generator().manual_seed(c))[:20].tolist()) for c in COUNTS]
    with vlmprune.wrap(model, "fixed", stage="encoder", layer=2, indices=picks, budget=20) as handle:
        pruned = forward(model, inputs)
    assert handle.stats["llm_visual_tokens"] == [20, 20]
    with torch.no_grad():
        kept, feats = [], []
        for i, grid in enumerate(GRIDS):
            r, f = visual_by_hand(model, pixels_of(inputs, i), grid, {2: lambda means, raster, i=i: torch.tensor(picks[i])})
            assert r.tolist() == picks[i]
            kept.append(r)
            feats.append(f)
        ref, mask = prompt_by_hand(model, inputs, kept, feats)
    assert_real_tokens_close(pruned, ref, mask)


def test_manual_merged_values_shift_the_group():
    """A recovery method's ``merged`` values at the encoder stage: each kept group's patches are
    shifted so that the group's mean equals the merged value (documented in adapters/qwen.py)."""
    model = model_for("2.5-deep")
    inputs = qwen_batch(TEXTS, GRIDS, seed=7)

    @dataclass
    class Doubled(TopNorm):
        name = "test_topnorm_doubled"

        def select(self, ctx):
            keep = top_norm(ctx.tokens, ctx.budget)
            kept = ctx.tokens.gather(1, keep[..., None].expand(-1, -1, ctx.tokens.shape[-1]))
            return Selection(keep=keep, merged=2 * kept)

    with vlmprune.wrap(model, Doubled(layers=(2,)), budget=12):
        pruned = forward(model, inputs)
    with torch.no_grad():
        kept, feats = [], []
        for i, grid in enumerate(GRIDS):

            def keep_at(means, raster):
                pick = top_norm(means[None], 12)[0]
                return raster[pick], 2 * means[pick]

            r, f = visual_by_hand(model, pixels_of(inputs, i), grid, {2: keep_at})
            kept.append(r)
            feats.append(f)
        ref, mask = prompt_by_hand(model, inputs, kept, feats)
    assert_real_tokens_close(pruned, ref, mask)


# 3. batch -----------------------------------------------------------------------------------------------
@cases
def test_batch_of_different_sizes_equals_single_runs(version, layers):
    model = model_for(version)
    inputs = qwen_batch(TEXTS, GRIDS, seed=2)
    with vlmprune.wrap(model, TopNorm(layers=layers), budget=budget_for(layers, 0.25)):
        batched, tokens = forward(model, inputs)[:, -1], generate(model, inputs)
        for i in range(2):
            single = qwen_batch([TEXTS[i]], [GRIDS[i]], seed=2)
            single["pixel_values"] = pixels_of(inputs, i)
            torch.testing.assert_close(forward(model, single)[0, -1], batched[i], atol=1e-4, rtol=1e-4)
            assert torch.equal(generate(model, single)[0], tokens[i])


# 4. cache -----------------------------------------------------------------------------------------------
@cases
def test_cache_equivalence(version, layers):
    model = model_for(version)
    inputs = qwen_batch(TEXTS, GRIDS, seed=3)
    with vlmprune.wrap(model, TopNorm(layers=layers), budget=budget_for(layers, 0.25)):
        assert torch.equal(generate(model, inputs, 5), no_cache_loop(model, inputs, 5))


@pytest.mark.parametrize("version", ["2", "2.5-deep"])
def test_flowcut_manual_equivalence(version):
    """FlowCut end to end on Qwen, rebuilt by hand from its recorded choices: the tower block by
    block keeping the recorded merge groups before each encoder point (the last one before the
    merger), the prompt with the kept image tokens at their own 3-D positions, then the LLM layer
    by layer dropping the image tokens the llm:2 choice did not keep."""
    model = model_for(version)
    inputs = qwen_batch(TEXTS, GRIDS, seed=9)
    with vlmprune.wrap(model, "flowcut", budget=0.25, interval=1) as handle, record_selections(handle) as seen:
        pruned = forward(model, inputs)
    depth = model.config.vision_config.depth
    assert [str(p) for p in handle.method.points(handle.adapter.info())] == [f"encoder:{l}" for l in range(1, depth + 1)] + ["llm:2"]
    core = model.model
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        pos, _ = core.get_rope_index(ids, image_grid_thw=inputs["image_grid_thw"], attention_mask=mask, mm_token_type_ids=inputs["mm_token_type_ids"])
        for i, grid in enumerate(GRIDS):
            mine = [rec for rec in seen if i in rec.images]
            keep_at = {}
            for rec in mine:
                if rec[0].stage == "encoder":
                    j = rec.images.index(i)
                    keep_at[rec[0].layer] = lambda means, raster, kept=rec[1][j, rec[2].keep[j]]: kept
            kept, feats = visual_by_hand(model, pixels_of(inputs, i), grid, keep_at)
            assert kept.numel() == 2 * round(0.25 * COUNTS[i])  # encoder_keep: twice the budget
            real = mask[i].bool()
            row_ids = ids[i][real]
            img = (row_ids == QWEN_IMAGE).nonzero().flatten()
            emb = core.get_input_embeddings()(row_ids)
            emb[img[kept]] = feats.to(emb.dtype)
            take = torch.ones(row_ids.numel(), dtype=torch.bool)
            take[img] = False
            take[img[kept]] = True
            seq = take.nonzero().flatten()
            (llm,) = [rec for rec in mine if rec[0].stage == "llm"]
            j = llm.images.index(i)
            assert torch.equal(llm[1][j], kept)  # the llm point sees the encoder's survivors, in raster order
            visual = torch.searchsorted(seq, img[kept])  # their places in the shortened row
            others = torch.ones(seq.numel(), dtype=torch.bool)
            others[visual] = False
            stay = torch.sort(torch.cat([others.nonzero().flatten(), visual[llm[2].keep[j]]])).values
            ref = run_qwen_layers(model, emb[seq][None], pos[:, i : i + 1, real][:, :, seq], {2: stay})
            assert llm[2].keep[j].numel() == round(0.25 * COUNTS[i])
            torch.testing.assert_close(pruned[i, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-5)


def test_encoder_then_projector():
    """Encoder pruning followed by a projector-stage method on the surviving tokens."""
    model = model_for("2.5")
    inputs = qwen_batch(TEXTS, GRIDS, seed=6)

    @dataclass
    class Both(TopNorm):
        name = "test_topnorm_both"
        stages = ("encoder", "projector")

        def points(self, info):
            return [Point("encoder", 1), Point("projector")]

    with vlmprune.wrap(model, Both(), budget={"encoder": 0.5, "projector": 0.25}) as handle, record_selections(handle) as seen:
        forward(model, inputs)
    assert handle.stats["llm_visual_tokens"] == [16, 15]
    projector = [rec for rec in seen if rec[0].stage == "projector"]
    assert [rec[1].shape[1] for rec in projector] == [32, 30]  # the encoder's survivors, per grid


def test_two_images_of_different_sizes_in_one_prompt():
    """Two images in one prompt (packed in one tower call): keep-all equals the unwrapped model,
    and each image keeps its own fraction of its own merge groups."""
    model = model_for("2.5-deep")
    inputs = qwen_prompt_with_images(GRIDS, [10, 11], [1, 2])
    ref = generate(model, inputs, 3)
    with vlmprune.wrap(model, TopNorm(layers=(2,)), budget=1.0):
        assert torch.equal(generate(model, inputs, 3), ref)
    with vlmprune.wrap(model, TopNorm(layers=(2,)), budget=0.5) as handle:
        assert torch.equal(generate(model, inputs, 3), no_cache_loop(model, inputs, 3))
    assert handle.stats["llm_visual_tokens"] == [32, 30]


# 6. unwrap and errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["2", "2.5"])
def test_unwrap_restores_and_errors(version):
    model = model_for(version)
    inputs = qwen_batch(TEXTS, GRIDS, seed=4)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    ref = forward(model, inputs)
    visual = model.model.visual
    with torch.no_grad():
        ref_visual = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    handle = vlmprune.wrap(model, TopNorm(), budget=8)
    assert forward(model, inputs).shape[1] < ref.shape[1]
    with torch.no_grad():  # the tower called outside the adapter's image path (videos) is untouched
        torch.testing.assert_close(visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output, ref_visual, atol=0, rtol=0)
    handle.unwrap()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    torch.testing.assert_close(forward(model, inputs), ref, atol=0, rtol=0)
    for bad in (0, 3):
        with pytest.raises(ValueError, match=r"encoder pruning layer must be an int in \[1, 2\]"):
            vlmprune.wrap(model, TopNorm(layers=(bad,)), budget=8)
    with pytest.raises(ValueError, match="stage.*must be one of"):
        vlmprune.wrap(model, "fixed", stage="vision", indices=[0], budget=1)
    with pytest.raises(ValueError, match="saliency='cls' needs a CLS token"):  # hiprune/holov now run on Qwen
        vlmprune.wrap(model, "holov", budget=8, saliency="cls")
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
