"""LLaVA-NeXT under each method's official NeXT packing (``next_packing``, the default of HiPrune,
HoloV and FlowCut), rebuilt by hand from the unwrapped model's per-crop features:

- HiPrune ``"spatial"`` (its code hard-codes ``mm_patch_merge_type='spatial'``): every crop whole,
  letterbox tokens included, the base image's kept tokens, then the joined tile grid row by row,
  no newlines;
- HoloV ``"unpad"``: base + un-padded tiles, no newlines, HoloV's kept tokens in its own order;
- FlowCut ``"unpad"``: base, then the un-padded tile tokens in packed order, no newlines.

The adapter's general rule (``next_packing="adapter"``) keeps the identity and by-hand rows of
tests/test_truth_next.py; batch and cache equivalence of the defaults run there too. Tiny random
LLaVA-NeXT of that file; CPU, no network."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from tests.cases import NEXT
from tests.truth import manual_encoder_features, pruned_prompt, record_selections, vision_features

CROPS, N, SIZES, TEXTS, TOTALS = NEXT.CROPS, NEXT.N, NEXT.SIZES, NEXT.TEXTS, NEXT.TOTALS
forward, layout, model_for, next_batch = NEXT.forward, NEXT.layout, NEXT.model, NEXT.next_batch

SIDE = 8  # tokens per crop side
# (tile rows, tile cols) of each image size under the pinpoints [[32, 64], [64, 32], [64, 64]]
TILE_GRID = {(64, 40): (2, 2), (24, 64): (1, 2), (32, 32): (1, 2)}
SLOTS = [240, 166]  # placeholders of the first two images: un-padded tokens plus newlines


def crop_features(model, inputs, i: int) -> torch.Tensor:
    """Projected features of every crop of image ``i``, on its whole grid: ``[crops, N, D]``."""
    with torch.no_grad():
        feats, _ = vision_features(model, inputs["pixel_values"][i, : CROPS[i]])
        return model.model.multi_modal_projector(feats)


def spatial_ids(size) -> list[int]:
    """``crop * N + raster`` in the official 'spatial' order: the base image, then the joined tile
    grid (tiles in row-major order, each ``SIDE x SIDE``) row by row, letterbox included."""
    rows, cols = TILE_GRID[size]
    ids = list(range(N))
    for y in range(rows * SIDE):
        for x in range(cols * SIDE):
            tile = (y // SIDE) * cols + x // SIDE
            ids.append((1 + tile) * N + (y % SIDE) * SIDE + x % SIDE)
    return ids


def unpad_ids(lay: torch.Tensor) -> list[int]:
    """``crop * N + raster`` of the un-padded packing without its newline tokens."""
    return [int(g) for g in lay if g >= 0]


def check_logits(model, inputs, pruned, tokens):
    with torch.no_grad():
        embeds, mask, pos = pruned_prompt(model, inputs, tokens)
        ref = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
    for i in range(len(tokens)):
        n = int(mask[i].sum())
        torch.testing.assert_close(pruned[i, -n:], ref[i, -n:], atol=1e-5, rtol=1e-5)


def test_spatial_ids_is_transformers_order_before_unpadding():
    """The by-hand order matches transformers' packing where un-padding cuts nothing: a tile
    token's place among the un-padded ids keeps the spatial order."""
    lay = layout(model_for(), SIZES[:2])
    for size, lay_i in zip(SIZES[:2], lay):
        kept = set(unpad_ids(lay_i))
        assert [g for g in spatial_ids(size) if g in kept] == unpad_ids(lay_i)
        assert len(spatial_ids(size)) == CROPS[SIZES.index(size)] * N > len(kept)


def test_hiprune_spatial_by_hand():
    """HiPrune's default: candidates are every crop's whole grid (a crop's ``token_index`` is its
    full raster), ``int(budget / crops)`` each of ``crops * N`` tokens, and the LLM gets the base
    image's kept tokens then the joined tile grid's in raster order, letterbox tokens included,
    no newlines; the logits equal that sequence built by hand."""
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2], seed=1)
    with vlmprune.wrap(model, "hiprune", budget=0.25) as handle:
        with record_selections(handle) as seen:
            pruned = forward(model, inputs)
    first_crop = [0, CROPS[0]]
    kept = [set(), set()]
    for rec in seen:
        assert rec[0].stage == "projector"
        for j, key in enumerate(rec.images):
            g = key - 2  # crop keys: the crop's index plus the number of images
            img = 0 if g < first_crop[1] else 1
            assert torch.equal(rec[1][j], torch.arange(N))  # the whole grid
            kept[img].update((g - first_crop[img]) * N + int(r) for r in rec[2].keep[j])
    # 0.25 of 5 x 64 = 80 -> 16 per crop; of 3 x 64 = 48 -> 16 per crop
    assert [len(k) for k in kept] == handle.stats["llm_visual_tokens"] == [80, 48]
    lay = layout(model, SIZES[:2])
    assert any(kept[i] - set(unpad_ids(lay[i])) for i in range(2))  # letterbox tokens reach the LLM
    tokens = []
    for i in range(2):
        feats = crop_features(model, inputs, i).flatten(0, 1)
        tokens.append(feats[[g for g in spatial_ids(SIZES[i]) if g in kept[i]]])
    check_logits(model, inputs, pruned, tokens)


def test_holov_unpad_keeps_its_order_by_hand():
    """HoloV's default: one call per image over base + un-padded tiles; the LLM gets the kept
    tokens in HoloV's own order (chunk by chunk, descending attention in a partly kept chunk),
    no newlines."""
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2], seed=1)
    with vlmprune.wrap(model, "holov", budget=0.25) as handle:
        with record_selections(handle) as seen:
            pruned = forward(model, inputs)
    lay = layout(model, SIZES[:2])
    order = [None, None]
    for rec in seen:
        for j, img in enumerate(rec.images):
            assert torch.equal(rec[1][j], torch.tensor(unpad_ids(lay[img])))
            order[img] = rec[1][j][rec[2].keep[j]].tolist()
    assert any(o != sorted(o) for o in order)  # not raster order: re-sorting would fail below
    assert handle.stats["llm_visual_tokens"] == [len(o) for o in order]
    tokens = [crop_features(model, inputs, i).flatten(0, 1)[order[i]] for i in range(2)]
    check_logits(model, inputs, pruned, tokens)


def test_flowcut_unpad_by_hand():
    """FlowCut's default (encoder stage alone here, ``llm_stage="off"``): each crop's survivors
    rebuilt through the unwrapped tower with its recorded keeps, then the base image's tokens and
    the un-padded tile tokens in packed order, no newlines (tokens kept in the letterbox vanish)."""
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2], seed=1)
    with vlmprune.wrap(model, "flowcut", budget=0.25, interval=1, llm_stage="off") as handle:
        with record_selections(handle) as seen:
            pruned = forward(model, inputs)
    keeps: dict[int, list] = {}  # crop key -> [(layer, keep)], survivors' rasters
    survivors: dict[int, list] = {}
    for rec in seen:
        point, token_index, sel = rec
        for j, key in enumerate(rec.images):
            keeps.setdefault(key - 2, []).append((point.layer, sel.keep[j]))
            survivors[key - 2] = token_index[j][sel.keep[j]].tolist()
    lay = layout(model, SIZES[:2])
    first_crop = [0, CROPS[0]]
    tokens = []
    with torch.no_grad():
        for i in range(2):
            by_id = {}
            for c in range(CROPS[i]):
                g = first_crop[i] + c
                feats = manual_encoder_features(model, inputs["pixel_values"][i : i + 1, c], keeps[g])
                proj = model.model.multi_modal_projector(feats)
                by_id.update({c * N + r: proj[k] for k, r in enumerate(survivors[g])})
            ids = [g for g in unpad_ids(lay[i]) if g in by_id]
            assert len(ids) < len(by_id)  # some survivors lay in the letterbox
            tokens.append(torch.stack([by_id[g] for g in ids]))
    assert handle.stats["llm_visual_tokens"] == [t.shape[0] for t in tokens]
    check_logits(model, inputs, pruned, tokens)


@pytest.mark.parametrize("name,options", [("holov", {}), ("flowcut", dict(interval=1, llm_stage="off"))])
def test_unpad_keep_all_is_the_model_without_newlines(name, options):
    """A full budget under 'unpad' is not the unwrapped model (that one has newline tokens): it
    is the un-padded tokens in packed order without them."""
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2], seed=1)
    with vlmprune.wrap(model, name, budget=1.0, **options) as handle:
        pruned = forward(model, inputs)
    assert handle.stats["llm_visual_tokens"] == TOTALS[:2]
    lay = layout(model, SIZES[:2])
    tokens = [crop_features(model, inputs, i).flatten(0, 1)[unpad_ids(lay[i])] for i in range(2)]
    check_logits(model, inputs, pruned, tokens)


def test_packing_errors():
    """'spatial' cannot fit more kept tokens than the span's placeholders (a full budget of a
    letterboxed image): a clear error naming the span and the option; 'adapter' fits; original
    positions are refused under 'spatial'; bad values name the choices."""
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2], seed=1)
    with vlmprune.wrap(model, "hiprune", budget=1.0):
        with pytest.raises(ValueError, match=r"keeps 320 tokens of image 0, but its placeholder span holds 240.*next_packing='adapter'"):
            forward(model, inputs)
    with vlmprune.wrap(model, "hiprune", budget=SLOTS[1]) as handle:  # 166 per image: 33 x 5, 55 x 3
        forward(model, inputs)
    assert handle.stats["llm_visual_tokens"] == [165, 165]
    with vlmprune.wrap(model, "hiprune", budget=1.0, next_packing="adapter") as handle:
        forward(model, inputs)
    assert handle.stats["llm_visual_tokens"] == TOTALS[:2]
    with pytest.raises(ValueError, match=r"next_packing='spatial'.*positions='compact'"):
        vlmprune.wrap(model, "hiprune", budget=16, positions="original")
    with pytest.raises(ValueError, match=r"option 'next_packing' of method 'hiprune' must be one of \['spatial', 'adapter'\]"):
        vlmprune.wrap(model, "hiprune", budget=16, next_packing="unpad")

    class Odd(vlmprune.Method):
        name = "test_odd_packing"
        stages = ("projector",)
        next_packing = "flat"

        def select(self, ctx):
            return vlmprune.Selection(keep=torch.arange(ctx.n).expand(ctx.tokens.shape[0], -1).clone())

    with pytest.raises(ValueError, match=r"option 'next_packing' of method 'test_odd_packing' must be one of \['adapter', 'unpad', 'spatial'\]"):
        vlmprune.wrap(model, Odd(), budget=16)
