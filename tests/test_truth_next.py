"""LLaVA-NeXT family tests beyond the conformance kit (tests/test_conformance.py runs the truth
oracles on tests/cases.py's ``NEXT`` case): the base-first split rule, HiPrune's equal shares,
HoloV's whole-image calls, crop budgets and stats, two images in one prompt, clear errors, and
the encoder stage (each crop one image row of the CLIP tower) rebuilt by hand. Tiny random
LLaVA-NeXT (8 x 8 tokens per crop; images of 5 and 3 crops), CPU, no network."""

from __future__ import annotations

import pytest
import torch
from vlmprune.adapters.llava_next import split_budget

import vlmprune
from tests.cases import NEXT
from tests.truth import manual_encoder_features, pruned_prompt, record_selections
from vlmprune.budget import equal_split

CROPS, N, SIZES, TEXTS, TOTALS = NEXT.CROPS, NEXT.N, NEXT.SIZES, NEXT.TEXTS, NEXT.TOTALS
forward, generate, layout, next_batch, model_for = NEXT.forward, NEXT.generate, NEXT.layout, NEXT.next_batch, NEXT.model
BUDGET = NEXT.budget


# layout, budgets, errors, several images per prompt --------------------------------------------
def test_split_rule_base_first_and_proportional():
    assert split_budget(56, [64, 40, 40, 40, 40]) == [16, 10, 10, 10, 10]
    assert split_budget(10, [64, 48, 48]) == [4, 3, 3]
    assert split_budget(3, [64, 64, 64]) == [1, 1, 1]
    assert split_budget(2, [64, 64, 64]) == [1, 1, 0]  # ties: the base image first
    assert split_budget(160, [64, 48, 48]) == [64, 48, 48]
    with pytest.raises(ValueError, match="budget"):
        split_budget(161, [64, 48, 48])


def test_hiprune_gives_every_crop_an_equal_share():
    """HiPrune's NeXT code keeps ``int(budget / crops)`` in every crop (not the proportional
    split); a crop with fewer tokens than its share keeps them all and the others share the
    rest, so a full budget keeps everything (the keep-all row)."""
    assert equal_split(56, [64, 40, 40, 40, 40]) == [11] * 5  # the remainder is dropped, as in the code
    assert equal_split(160, [576] * 5) == [32] * 5  # README: 160 = 5 crops x 32
    assert equal_split(224, [64, 40, 40, 40, 40]) == [64, 40, 40, 40, 40]
    assert equal_split(150, [64, 40, 40]) == [64, 40, 40] and equal_split(120, [64, 40, 40]) == [40, 40, 40]
    model = model_for()
    with vlmprune.wrap(model, "hiprune", budget=56) as handle:
        forward(model, next_batch(TEXTS, SIZES, seed=5))
    assert [o for p in handle.stats["points"] for o in p["out"]] == [11] * 5 + [18] * 3 + [18] * 3
    assert handle.stats["llm_visual_tokens"] == [55, 54, 54]


class CropProbe(vlmprune.Method):
    """Test method: keeps everything at the projector, recording each token's CLS attention by
    its llm-stage id (``whole``: the whole-image mode)."""

    name = "test_crop_probe"
    stages = ("projector",)
    needs = frozenset({"cls_attention"})

    def __init__(self, whole: bool):
        self.seed, self.seen = 0, {}
        self.projector_whole_image = whole

    def select(self, ctx):
        att = ctx.signals.cls_attention()
        for j, part in enumerate(ctx.whole_images()):
            index = part.index if ctx.parts else ctx.token_index[j]
            self.seen.update({int(t): float(a) for t, a in zip(index, att[j])})
        b, n = ctx.tokens.shape[:2]
        return vlmprune.Selection(keep=torch.arange(n).expand(b, n).clone())


def test_holov_sees_each_whole_image_once():
    """HoloV's NeXT code runs once per image over base + un-padded tiles: one projector call per
    image with the image's budget; each token's CLS attention is its own crop's (the same values
    as in per-crop calls, where a tile holds only its un-padded tokens)."""
    model = model_for()
    inputs = next_batch(TEXTS, SIZES, seed=5)
    with vlmprune.wrap(model, "holov", budget=56) as handle:
        forward(model, inputs)
    assert [(p["in"], p["out"]) for p in handle.stats["points"]] == [([t], [56]) for t in TOTALS]
    for i in range(len(TEXTS)):  # one image at a time: token ids are per image
        whole, crops = CropProbe(True), CropProbe(False)
        for probe in (whole, crops):
            with vlmprune.wrap(model, probe, budget=1.0):
                forward(model, NEXT.single(inputs, i, seed=5))
        assert len(whole.seen) == TOTALS[i] and whole.seen.keys() == crops.seen.keys()
        for key, value in whole.seen.items():
            assert abs(value - crops.seen[key]) < 1e-6


def test_stats_and_crop_budgets():
    """40 tokens per image, split over each image's crops in proportion (base first on ties);
    crops of one grid and share are one call. The newline rule is checked by hand in the manual
    tests (a tile row's newline stays iff the row keeps a token)."""
    model = model_for()
    inputs = next_batch(TEXTS, SIZES, seed=5)
    with vlmprune.wrap(model, "uniform", budget=40) as handle:
        forward(model, inputs)
    stats = handle.stats
    assert stats["llm_visual_tokens"] == [40, 40, 40]
    calls = [(p["in"], p["out"]) for p in stats["points"]]
    assert calls == [
        ([64], [12]), ([40] * 4, [7] * 4),  # 224 tokens: base 64 (11.4 -> 12 by remainder), tiles 8x5
        ([64], [16]), ([48] * 2, [12] * 2),  # 160 tokens: tiles 6x8 (rows cut)
        ([64], [20]), ([32] * 2, [10] * 2),  # 128 tokens: tiles 8x4 (columns cut)
    ]
    assert 0 < stats["llm_prefill_flops"] < stats["llm_prefill_flops_unpruned"]


def test_two_images_in_one_prompt():
    model = model_for()
    inputs = next_batch([[10, 11], [20]], [SIZES[0], SIZES[1], SIZES[2]], seed=6, images_per_row=[2, 1])
    ref, ref_tokens = forward(model, inputs), generate(model, inputs)
    with vlmprune.wrap(model, "divprune", budget=1.0):
        torch.testing.assert_close(forward(model, inputs), ref, atol=1e-5, rtol=0)
        assert torch.equal(generate(model, inputs), ref_tokens)
    with vlmprune.wrap(model, "divprune", budget=0.5) as handle:
        pruned = forward(model, inputs)
        assert generate(model, inputs).shape == (2, 3)
    assert handle.stats["llm_visual_tokens"] == [t // 2 for t in TOTALS]
    assert pruned.shape[1] < ref.shape[1]
    with vlmprune.wrap(model, "fastv", budget=24) as handle:
        generate(model, inputs)
    assert [p["out"] for p in handle.stats["points"]] == [[24]] * 3  # one llm call per image (different totals)


def test_clear_errors():
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2], seed=7)
    with pytest.raises(ValueError, match=r"encoder pruning layer .* must be in \[1, 2\]"):
        vlmprune.wrap(model, "fixed", budget=32, stage="encoder", layer=3, indices=[0, 1])
    with pytest.raises(ValueError, match=r"budget must be in \[1, 160\]"):  # per image, at the encoder stage too
        with vlmprune.wrap(model, "flowcut", budget=200):
            forward(model, inputs)
    vlmprune.wrap(model, "vflowopt", budget=32).unwrap()  # supported: importance map per image, across stages
    with pytest.raises(ValueError, match=r"budget must be in \[1, 160\]"):
        with vlmprune.wrap(model, "divprune", budget=200):
            forward(model, inputs)
    with vlmprune.wrap(model, "divprune", budget=16):
        with pytest.raises(ValueError, match="image_sizes"):
            model.model.get_image_features(inputs["pixel_values"])


# encoder stage: every crop is one image row of the CLIP tower ---------------------------------------
def _crop_shares(lay, budget_tokens: int) -> list[int]:
    k = int(lay.max()) // N + 1
    counts = [int(((lay >= 0) & (lay // N == c)).sum()) for c in range(k)]
    return split_budget(budget_tokens, counts)


@pytest.mark.parametrize("layer,budget", [(1, BUDGET), (2, 2)])
def test_encoder_manual(layer, budget):
    """``fixed`` at ``encoder:layer`` with its own index set per crop, rebuilt by hand: each kept
    crop alone through the unwrapped tower (the test's own pre-hook drops its tokens before the
    block), the projector, then the packing rule (base tokens first, tile tokens in packed order,
    a tile row's newline iff the row keeps a token; tokens kept in the letterbox padding vanish);
    budget 2 drops whole crops (their share is 0)."""
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2], seed=1)
    lay = layout(model, SIZES[:2])
    n_img, crops = 2, CROPS[:2]
    gen = torch.Generator().manual_seed(11)
    per_crop = [sorted(torch.randperm(N, generator=gen)[:12].tolist()) for _ in range(sum(crops))]
    rows = [per_crop[0]] * n_img + per_crop  # ctx.images of a crop: its index plus the number of images
    with vlmprune.wrap(model, "fixed", budget=budget, stage="encoder", layer=layer, indices=rows) as handle:
        with record_selections(handle) as seen:
            pruned = forward(model, inputs)
    assert {rec[0] for rec in seen} == {vlmprune.context.Point("encoder", layer)}
    called = sorted(k - n_img for rec in seen for k in rec.images)
    tokens, counts = [], []
    with torch.no_grad():
        g = 0
        for i in range(n_img):
            budget_tokens = round(budget * TOTALS[i]) if isinstance(budget, float) else budget
            shares = _crop_shares(lay[i], budget_tokens)
            slot_feats = torch.zeros(lay[i].shape[0], model.config.text_config.hidden_size)
            slot_feats[lay[i] < 0] = model.model.image_newline
            kept = set()
            for c in range(crops[i]):
                if shares[c] == 0:
                    assert g not in called
                    g += 1
                    continue
                keep = torch.tensor(per_crop[g])
                feats = manual_encoder_features(model, inputs["pixel_values"][i : i + 1, c], [(layer, keep)])
                proj = model.model.multi_modal_projector(feats)
                for j, r in enumerate(per_crop[g]):
                    hit = (lay[i] == c * N + r).nonzero().flatten()
                    if hit.numel():  # else: kept in the padding, cut by un-padding
                        slot_feats[hit] = proj[j]
                        kept.add((c, r))
                g += 1
            slots = NEXT.kept_slots(lay[i], kept, sorted(r for c, r in kept if c == 0))
            tokens.append(slot_feats[slots])
            counts.append(len(kept))
        embeds, mask, pos = pruned_prompt(model, inputs, tokens)
        ref = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
    assert handle.stats["llm_visual_tokens"] == counts
    for i in range(n_img):
        n = int(mask[i].sum())
        torch.testing.assert_close(pruned[i, -n:], ref[i, -n:], atol=1e-5, rtol=1e-5)


def test_encoder_budgets_and_counts():
    """40 tokens per image split over the crops by their un-padded counts, one tower run per image
    and share; FlowCut (encoder only)'s first point keeps a batch-max count over those crops (one
    count per call), its last exactly the share; per_image gives each crop its own count. With
    its LLM stage (the default here, official NeXT path) every crop keeps half the image's budget
    and the LLM stage keeps the budget."""
    model = model_for()
    inputs = next_batch(TEXTS, SIZES, seed=5)
    shares = [[12, 7, 7, 7, 7], [16, 12, 12], [20, 10, 10]]
    with vlmprune.wrap(model, "flowcut", budget=40, interval=1) as handle:
        forward(model, inputs)
    points = handle.stats["points"]
    assert [o for p in points if p["point"] == "encoder:2" for o in p["out"]] == [20] * sum(CROPS)
    entering = handle.stats["llm_visual_tokens"]
    assert all(40 < t <= 20 * k for t, k in zip(entering, CROPS))  # padding cut by un-padding
    assert sorted(n for p in points if p["point"] == "llm:2" for n in p["in"]) == sorted(entering)
    assert [o for p in points if p["point"] == "llm:2" for o in p["out"]] == [40] * len(CROPS)
    for count in ("batch_max", "per_image"):
        with vlmprune.wrap(model, "flowcut", budget=40, interval=1, count=count, llm_stage="off") as handle:
            forward(model, inputs)
        points = handle.stats["points"]
        last = [p["out"] for p in points if p["point"] == "encoder:2"]
        first = [p["out"] for p in points if p["point"] == "encoder:1"]
        if count == "batch_max":
            assert last == [[12], [7] * 4, [16], [12] * 2, [20], [10] * 2]
            assert all(len(set(o)) == 1 for o in first)
        else:
            assert last == [[s] for img in shares for s in img]
        assert all(p["in"] == [N] * len(p["in"]) for p in points if p["point"] == "encoder:1")
        # tokens kept in the letterbox padding are cut by un-padding: at most the budget reaches the LLM
        assert all(0 < t <= 40 for t in handle.stats["llm_visual_tokens"])
