"""VFlowOpt on the LLaVA-NeXT adapter: the projector stage runs per crop (base image, tiles) and
writes each crop's importance into its image's map (numbered ``crop * N + raster``, as the llm
stage numbers the image's tokens); the llm stages read it per image. Tiny random LLaVA-NeXT of
``tests/test_truth_next.py`` (8x8 tokens per crop; images of 5 and 3 crops); CPU, no network."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import vlmprune
from tests.cases import NEXT
from tests.truth import hook_count, positions_from_mask, record_selections
from tests.tiny import IMAGE_TOKEN
from vlmprune.methods.vflowopt import VFlowOpt

CROPS, N, SIZES, TEXTS, TOTALS = NEXT.CROPS, NEXT.N, NEXT.SIZES, NEXT.TEXTS, NEXT.TOTALS
forward, generate, layout, model_for, next_batch = NEXT.forward, NEXT.generate, NEXT.layout, NEXT.model, NEXT.next_batch

BUDGET = 0.25  # average over the LLM layers; r_1, r_2 from the released 25 % config


def _crop_rasters(lay: torch.Tensor, crops: int) -> list[list[int]]:
    """Per crop of one image, its tower rasters that survive un-padding (ascending): the
    projector stage's ``token_index`` indexes this list."""
    return [sorted(int(x) % N for x in lay.tolist() if x >= 0 and x // N == c) for c in range(crops)]


def _locate(key: int, n_img: int, crops: list[int]) -> tuple[int, int]:
    """(image, crop) of a projector-stage row key (crop index among all crops + number of images)."""
    g = key - n_img
    for img, k in enumerate(crops):
        if g < k:
            return img, g
        g -= k
    raise AssertionError(key)


def _joined_coords(lay: torch.Tensor) -> dict[int, tuple[int, int]]:
    """(row, col) of every tile token ``crop * N + raster`` in the joined, un-padded tile grid:
    after the base prefix, a newline (-1) ends each row."""
    base = int(((lay >= 0) & (lay < N)).long().cumprod(0).sum())
    coords, row, col = {}, 0, 0
    for g in lay[base:].tolist():
        if g < 0:
            row, col = row + 1, 0
        else:
            coords[g] = (row, col)
            col += 1
    return coords


def test_keep_all_equivalence():
    """Every token kept at every point (budget 1.0, no recycling): the unwrapped model's logits
    and greedy tokens."""
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2])
    ref_logits, ref_tokens = forward(model, inputs), generate(model, inputs)
    with vlmprune.wrap(model, "vflowopt", budget=1.0, recycle=False) as handle:
        torch.testing.assert_close(forward(model, inputs), ref_logits, atol=1e-5, rtol=0)
        assert torch.equal(generate(model, inputs), ref_tokens)
    assert handle.stats["llm_visual_tokens"] == TOTALS[:2]
    assert all(p["in"] == p["out"] for p in handle.stats["points"])


def test_importance_crosses_stages_planted(monkeypatch):
    """A planted importance (a random permutation over each image's ``crop * N + raster`` ids,
    computed by the test from the crop's row key and local index alone): the llm points keep
    exactly the current tokens with the highest planted importance, per image, with the counts
    of the ratios; the first llm point sees exactly the projector's survivors."""
    model = model_for()
    sizes = SIZES[:2]
    crops = [CROPS[SIZES.index(s)] for s in sizes]
    lay = layout(model, sizes)
    rasters = [_crop_rasters(lay[i], crops[i]) for i in range(2)]
    gen = torch.Generator().manual_seed(5)
    table = [(torch.randperm(k * N, generator=gen) + 1).float() / (k * N) for k in crops]

    def planted(self, ctx, t):
        rows = []
        for j, key in enumerate(ctx.images):
            img, c = _locate(key, 2, crops)
            ids = torch.tensor([c * N + rasters[img][c][int(k)] for k in ctx.token_index[j]])
            rows.append(table[img][ids])
        return torch.stack(rows)

    monkeypatch.setattr(VFlowOpt, "importance", planted)
    inputs = next_batch(TEXTS[:2], sizes, seed=1)
    with vlmprune.wrap(model, "vflowopt", budget=BUDGET) as handle:
        with record_selections(handle) as seen:
            forward(model, inputs)
    hp = handle.method.hyper(BUDGET, SimpleNamespace(llm_layers=4))
    survivors = [set(), set()]
    for rec in seen:
        if rec[0].stage != "projector":
            continue
        for j, key in enumerate(rec.images):
            img, c = _locate(key, 2, crops)
            survivors[img] |= {c * N + rasters[img][c][int(k)] for k in rec[2].keep[j]}
    llm = [rec for rec in seen if rec[0].stage == "llm"]
    assert sorted({rec[0].layer for rec in llm}) == [1, 3]
    first = {}
    for rec in llm:
        ratio = hp["r_1"] if rec[0].layer == 1 else hp["r_2"]
        for j, img in enumerate(rec.images):
            ids = rec[1][j]
            if rec[0].layer == 1:
                first[img] = set(ids.tolist())
            n = ids.numel()
            count = n - round(n * (1 - ratio))
            assert rec[2].keep[j].numel() == count
            torch.testing.assert_close(rec[2].scores[j], table[img][ids])
            expected = table[img][ids].topk(count).indices.sort().values
            assert torch.equal(rec[2].keep[j], expected)
    assert first == {0: survivors[0], 1: survivors[1]}
    assert handle.stats["llm_visual_tokens"] == [len(s) for s in survivors]


def test_real_importance_map_alignment():
    """With the real (attention) importance, each llm point's scores are the projector-stage
    scores of the same (crop, raster), per image."""
    model = model_for()
    sizes = SIZES[:2]
    crops = [CROPS[SIZES.index(s)] for s in sizes]
    lay = layout(model, sizes)
    rasters = [_crop_rasters(lay[i], crops[i]) for i in range(2)]
    inputs = next_batch(TEXTS[:2], sizes, seed=3)
    with vlmprune.wrap(model, "vflowopt", budget=0.5) as handle:
        with record_selections(handle) as seen:
            forward(model, inputs)
    maps = [torch.full((k * N,), float("nan")) for k in crops]
    for rec in seen:
        if rec[0].stage == "projector":
            for j, key in enumerate(rec.images):
                img, c = _locate(key, 2, crops)
                ids = torch.tensor([c * N + rasters[img][c][int(k)] for k in rec[1][j]])
                maps[img][ids] = rec[2].scores[j]
    checked = 0
    for rec in seen:
        if rec[0].stage == "llm":
            for j, img in enumerate(rec.images):
                torch.testing.assert_close(rec[2].scores[j], maps[img][rec[1][j]])
                checked += 1
    assert checked == 4  # two images, two llm points


def test_recycling_cells_on_the_joined_tile_grid():
    """Per crop, each pruned token is carried by a kept token of the same recycling cell: the
    base image's own grid for crop 0, the joined un-padded tile grid for tiles (cell side
    ``m * side / 27`` tokens)."""
    model = model_for()
    sizes = SIZES[:2]
    crops = [CROPS[SIZES.index(s)] for s in sizes]
    lay = layout(model, sizes)
    rasters = [_crop_rasters(lay[i], crops[i]) for i in range(2)]
    joined = [_joined_coords(lay[i]) for i in range(2)]
    inputs = next_batch(TEXTS[:2], sizes, seed=4)
    with vlmprune.wrap(model, "vflowopt", budget=BUDGET) as handle:
        with record_selections(handle) as seen:
            forward(model, inputs)
    cell = handle.method.hyper(BUDGET, SimpleNamespace(llm_layers=4))["m"] * 8 / 27
    merged = 0
    for rec in seen:
        if rec[0].stage != "projector":
            continue
        for j, key in enumerate(rec.images):
            img, c = _locate(key, 2, crops)
            keep = rec[2].keep[j]
            owner = rec[2].merge_map[j]
            for t in range(rec[1].shape[1]):
                carrier = int(keep[owner[t]])
                if carrier == t:
                    continue
                merged += 1
                a, b = (c * N + rasters[img][c][k] for k in (t, carrier))
                if c == 0:
                    ra, rb = divmod(a, 8), divmod(b, 8)
                else:
                    ra, rb = joined[img][a], joined[img][b]
                assert (int(ra[0] // cell), int(ra[1] // cell)) == (int(rb[0] // cell), int(rb[1] // cell))
    assert merged > 0


def test_batch_equivalence():
    """Images with 5 and 3 crops and left padding: the same logits, greedy tokens and kept
    tokens per image as each image alone."""
    model = model_for()
    inputs = next_batch(TEXTS, SIZES, seed=2)
    with vlmprune.wrap(model, "vflowopt", budget=BUDGET) as handle:
        NEXT.assert_batch_equals_single(model, inputs, seed=2)
        with record_selections(handle) as seen:
            forward(model, inputs)
        batched = handle.stats["llm_visual_tokens"]
        kept = {(rec[0].layer, img): rec[1][j][rec[2].keep[j]]
                for rec in seen if rec[0].stage == "llm" for j, img in enumerate(rec.images)}
        for i in range(len(TEXTS)):
            with record_selections(handle) as alone:
                forward(model, NEXT.single(inputs, i, seed=2))
            assert handle.stats["llm_visual_tokens"] == [batched[i]]
            for rec in alone:
                if rec[0].stage == "llm":
                    assert torch.equal(rec[1][0][rec[2].keep[0]], kept[(rec[0].layer, i)])
    assert len(set(batched)) == 3


def test_cache_equivalence():
    """generate() with the KV cache gives the tokens of a no-cache greedy loop (VFlowOpt's
    choices depend on the image only, so every no-cache step repeats the prefill's)."""
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2], seed=3)
    with vlmprune.wrap(model, "vflowopt", budget=BUDGET):
        cached = generate(model, inputs, steps=3)
        assert torch.equal(NEXT.no_cache(model, inputs, 3), cached)


def test_unwrap_restores():
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2], seed=4)
    ref = forward(model, inputs)
    before = hook_count(model)
    handle = vlmprune.wrap(model, "vflowopt", budget=0.1)
    assert hook_count(model) > before
    assert forward(model, inputs).shape[1] < ref.shape[1]
    handle.unwrap()
    assert hook_count(model) == before
    assert "get_image_features" not in vars(model.model)
    torch.testing.assert_close(forward(model, inputs), ref, atol=0, rtol=0)


@pytest.mark.parametrize("recycle", [False, True])
def test_counts_follow_the_ratios(recycle):
    """Per crop: ``n - round(n (1 - r_v))`` kept without recycling (plus one carrier per
    non-empty cell with it), ``r_v`` from the whole image's budget; each image's llm counts
    follow ``r_1``, ``r_2`` on its own visual tokens."""
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2], seed=6)
    with vlmprune.wrap(model, "vflowopt", budget=BUDGET, recycle=recycle) as handle:
        forward(model, inputs)
    hp = handle.method.hyper(BUDGET, SimpleNamespace(llm_layers=4))
    proj = [p for p in handle.stats["points"] if p["point"] == "projector"]
    for p in proj:
        for n, out in zip(p["in"], p["out"]):
            low = n - round(n * (1 - hp["r_v"]))
            assert out == low if not recycle else low <= out
    llm1 = [p for p in handle.stats["points"] if p["point"] == "llm:1"]
    llm3 = [p for p in handle.stats["points"] if p["point"] == "llm:3"]
    for a, b in zip(llm1, llm3):
        (m,), (k,) = a["in"], a["out"]
        assert k == m - round(m * (1 - hp["r_1"]))
        assert b["in"] == [k] and b["out"] == [k - round(k * (1 - hp["r_2"]))]
    per_image = [p["in"][0] for p in llm1]
    assert sorted(per_image) == sorted(handle.stats["llm_visual_tokens"])


class ShiftProjected(vlmprune.Method):
    """Test method: keeps every token of a crop and hands back, in LLM space
    (``merged_space="projected"``), each kept token's projection plus 1."""

    name = "test_shift_projected"
    stages = ("projector",)
    needs = frozenset({"projected"})

    def __init__(self):
        self.seed = 0

    def select(self, ctx):
        b, n = ctx.tokens.shape[:2]
        return vlmprune.Selection(
            keep=torch.arange(n).expand(b, n).clone(), merged=ctx.signals.projected() + 1.0, merged_space="projected"
        )


def test_llm_space_merged_values_replace_the_projections():
    """``merged_space="projected"`` (VFlowOpt's recycled values): the LLM receives the given
    values at every visual slot, the newlines unchanged (by hand: the unwrapped model's packed
    features plus 1 at visual slots)."""
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2], seed=8)
    lay = layout(model, SIZES[:2])
    ids = inputs["input_ids"]
    with torch.no_grad():
        full = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        emb = model.model.get_input_embeddings()(ids)
        shifted = torch.cat([f + (lay_i >= 0)[:, None].to(f.dtype) for f, lay_i in zip(full, lay)])
        emb = emb.masked_scatter((ids == IMAGE_TOKEN)[..., None], shifted)
        ref = model(inputs_embeds=emb, attention_mask=inputs["attention_mask"], position_ids=positions_from_mask(inputs["attention_mask"])).logits
    with vlmprune.wrap(model, ShiftProjected(), budget=1.0):
        torch.testing.assert_close(forward(model, inputs), ref, atol=1e-5, rtol=1e-5)
