"""Truth tests of DESIGN.md for the LLaVA-NeXT adapter, on a tiny random LLaVA-NeXT built from
configs (CLIP tower 32 px / patch 4: 8x8 tokens per crop; grid pinpoints 32x64, 64x32, 64x64, so
an image is a base crop plus 2 or 4 tiles, with un-padding cutting rows or columns of the tile
grid). Images of different sizes (5 and 3 crops) in one left-padded batch; CPU, no network."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)
from vlmprune.adapters.llava_next import split_budget
from vlmprune.budget import equal_split

import vlmprune
from tests.tiny import IMAGE_TOKEN, PAD, VOCAB
from tests.truth import (
    Replay,
    manual_encoder_features,
    positions_from_mask,
    pruned_prompt,
    record_selections,
    run_layers,
)

SIDE, PATCH = 32, 4
N = (SIDE // PATCH) ** 2  # tokens per crop
PINPOINTS = [[32, 64], [64, 32], [64, 64]]
# (height, width): 2x2 tiles with columns cut (224 visual tokens + 16 newlines), 1x2 tiles with
# rows cut (160 + 6), 1x2 tiles with columns cut (128 + 8)
SIZES = [(64, 40), (24, 64), (32, 32)]
TOTALS = [224, 160, 128]
CROPS = [5, 3, 3]
TEXTS = [[10, 11, 12, 13, 14], [20, 21], [30, 31, 32]]

# identity: keeping every token reproduces the unwrapped model; batch: the selection of one
# image does not depend on the others; manual: a pure selection at one point (rebuilt by hand)
METHODS = {
    "random": dict(identity=True, batch=False, manual=True),
    "uniform": dict(identity=True, batch=True, manual=True),
    "divprune": dict(identity=True, batch=True, manual=True),
    "fastv": dict(identity=True, batch=True, manual=True),
    "visionzip": dict(identity=False, batch=True, manual=False),
    "prumerge_plus": dict(identity=False, batch=True, manual=False),
    "hiprune": dict(identity=True, batch=True, manual=True),
    "holov": dict(identity=True, batch=True, manual=True),
    "fopru": dict(identity=True, batch=True, manual=True),
    "zoo_prune": dict(identity=True, batch=True, manual=True),
    "todre": dict(identity=False, batch=True, manual=False),
    "feather": dict(identity=True, batch=True, manual=False),
    "transprune": dict(identity=True, batch=True, manual=False),
    "adatoken3d": dict(identity=True, batch=True, manual=False),
}
BUDGET = 0.25
# methods whose default follows their official NeXT packing (no newlines; HiPrune: no un-padding):
# the identity and by-hand rows below run the adapter's general rule, the official packings are
# checked by hand in tests/test_next_official_packing.py; batch and cache run the defaults
ADAPTER_PACKING = {"hiprune": dict(next_packing="adapter"), "holov": dict(next_packing="adapter")}

_MODEL: dict = {}


def tiny_llava_next(seed: int = 0) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        image_size=SIDE, patch_size=PATCH, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def model_for():
    if "m" not in _MODEL:
        _MODEL["m"] = tiny_llava_next()
    return _MODEL["m"]


def layout(model, sizes):
    """Per image, what each placeholder slot holds in the unwrapped model: ``crop * N + raster``
    or -1 for a newline (an id tensor packed by transformers' own ``pack_image_features``)."""
    crops = [CROPS[SIZES.index(tuple(s))] for s in sizes]
    ids = [torch.arange(k * N, dtype=torch.float64).view(k, N, 1) for k in crops]
    packed, _ = model.model.pack_image_features(ids, torch.tensor(sizes), "default", image_newline=torch.tensor([-1.0], dtype=torch.float64))
    return [p[:, 0].long() for p in packed]


def next_batch(texts, sizes, seed=0, images_per_row=None):
    """``[BOS] [image] text`` per row (or several images per row), left padding; pixel_values
    5-D padded to the most crops, as the processor returns them."""
    gen = torch.Generator().manual_seed(seed)
    crops = [CROPS[SIZES.index(s)] for s in sizes]
    lengths = [len(lay) for lay in layout(model_for(), sizes)]  # placeholder tokens per image
    images_per_row = images_per_row or [1] * len(texts)
    rows, at = [], 0
    for text, n_img in zip(texts, images_per_row):
        row = [1]
        for j in range(n_img):
            row += [IMAGE_TOKEN] * lengths[at] + ([40 + j] if j + 1 < n_img else [])
            at += 1
        rows.append(row + text)
    longest = max(map(len, rows))
    pixels = torch.zeros(len(sizes), max(crops), 3, SIDE, SIDE)
    for i, k in enumerate(crops):
        pixels[i, :k] = torch.randn(k, 3, SIDE, SIDE, generator=gen)
    return {
        "input_ids": torch.tensor([[PAD] * (longest - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows]),
        "pixel_values": pixels,
        "image_sizes": torch.tensor(sizes),
    }


def single(inputs, i, texts, sizes, seed):
    one = next_batch([texts[i]], [sizes[i]], seed=seed)
    one["pixel_values"] = inputs["pixel_values"][i : i + 1, : CROPS[SIZES.index(sizes[i])]]
    return one


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, position_ids=positions_from_mask(inputs["attention_mask"])).logits


def generate(model, inputs, steps=3):
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    return out[:, inputs["input_ids"].shape[1] :]


def greedy_no_cache(model, inputs, steps):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    new = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                           image_sizes=inputs["image_sizes"], position_ids=positions_from_mask(mask), use_cache=False).logits
        last = logits[:, -1]
        last[:, IMAGE_TOKEN] = float("-inf")
        last[:, model.config.text_config.eos_token_id] = float("-inf")
        nxt = last.argmax(-1, keepdim=True)
        new.append(nxt)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return torch.cat(new, 1)


def full_image_tokens(model, inputs):
    """The unwrapped model's packed image features, one ``[slots, D]`` tensor per image."""
    with torch.no_grad():
        return list(model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output)


methods = pytest.mark.parametrize("name", list(METHODS))

_REF: dict = {}


# 1. keep-all equivalence -----------------------------------------------------------------------
@methods
def test_keep_all_equivalence(name):
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2])
    if "ref" not in _REF:
        _REF["ref"] = forward(model, inputs), generate(model, inputs)
    ref_logits, ref_tokens = _REF["ref"]
    with vlmprune.wrap(model, name, budget=1.0, **ADAPTER_PACKING.get(name, {})) as handle:
        if not METHODS[name]["identity"]:
            pytest.skip(f"{name} merges tokens (or halves them inside the LLM) by design: no identity at full budget")
        torch.testing.assert_close(forward(model, inputs), ref_logits, atol=1e-5, rtol=0)
        assert torch.equal(generate(model, inputs), ref_tokens)
    assert handle.stats["llm_visual_tokens"] == TOTALS[:2]  # newline tokens are not counted


# 2. manual equivalence -----------------------------------------------------------------------------
def _kept_slots(slot_ids, kept: set[tuple[int, int]], base_order: list[int]) -> torch.Tensor:
    """Slots of one image kept by hand: the base image's chosen tokens in the method's order
    (base slot ``r`` holds raster ``r``), then the chosen tile tokens in slot order and the
    newline of each tile row that keeps a token."""
    base = int(((slot_ids >= 0) & (slot_ids < N)).long().cumprod(0).sum())
    assert torch.equal(slot_ids[:base], torch.arange(N))
    keep, row = list(base_order), []
    for s, g in enumerate(slot_ids.tolist()):
        if s < base:
            continue
        if g >= 0 and (g // N, g % N) in kept:
            keep.append(s)
            row.append(s)
        elif g < 0:
            if row:
                keep.append(s)
            row = []
    return torch.tensor(keep)


@methods
def test_manual_equivalence(name):
    if not METHODS[name]["manual"]:
        pytest.skip(f"{name}: merging or several points; covered by keep-all, batch and cache here")
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2], seed=1)
    with vlmprune.wrap(model, name, budget=BUDGET, **ADAPTER_PACKING.get(name, {})) as handle:
        with record_selections(handle) as seen:
            pruned = forward(model, inputs)
    lay = layout(model, SIZES[:2])
    full = full_image_tokens(model, inputs)
    if seen[0][0].stage == "projector":
        assert {rec[0].stage for rec in seen} == {"projector"}
        first_crop = [0, CROPS[0]]
        kept, base_order = [set(), set()], [[], []]
        for rec in seen:
            _, token_index, sel = rec
            for j, key in enumerate(rec.images):
                if key < 2:  # a whole image (HoloV): token ids crop * N + raster, in packed order
                    assert torch.equal(token_index[j], lay[key][lay[key] >= 0])
                    for k in sel.keep[j].tolist():
                        c, r = divmod(int(token_index[j, k]), N)
                        kept[key].add((c, r))
                        if c == 0:
                            base_order[key].append(r)
                    continue
                g = key - 2  # crop keys are the crop index plus the number of images
                img = 0 if g < first_crop[1] else 1
                c = g - first_crop[img]
                valid = sorted({int(x) % N for x in lay[img].tolist() if x >= 0 and x // N == c})
                for k in sel.keep[j].tolist():
                    kept[img].add((c, valid[int(token_index[j, k])]))
                    if c == 0:
                        base_order[img].append(valid[int(token_index[j, k])])
        tokens = [full[i][_kept_slots(lay[i], kept[i], base_order[i])] for i in range(2)]
        budgets = [round(BUDGET * t) for t in TOTALS[:2]]
        if name == "hiprune":  # equal shares per crop (its NeXT code), the remainder dropped
            sizes = [[int(((lay_i >= 0) & (lay_i // N == c)).sum()) for c in range(k)] for lay_i, k in zip(lay, CROPS[:2])]
            budgets = [sum(equal_split(b, s)) for b, s in zip(budgets, sizes)]
        assert handle.stats["llm_visual_tokens"] == [len(k) for k in kept] == budgets
        with torch.no_grad():
            embeds, mask, pos = pruned_prompt(model, inputs, tokens)
            ref = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
        for i in range(2):
            n = int(mask[i].sum())
            torch.testing.assert_close(pruned[i, -n:], ref[i, -n:], atol=1e-5, rtol=1e-5)
        return
    # one llm point: drop the unkept visual tokens (not newlines) before layer K, original positions
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    emb = model.model.get_input_embeddings()(ids).masked_scatter((ids == IMAGE_TOKEN)[..., None], torch.cat(full))
    for rec in seen:
        point, token_index, sel = rec
        assert point.stage == "llm"
        for j, img in enumerate(rec.images):
            real = mask[img].bool()
            span = (ids[img][real] == IMAGE_TOKEN).nonzero().flatten()
            visual = span[lay[img] >= 0]
            assert torch.equal(token_index[j], lay[img][lay[img] >= 0])  # raster ids: crop * N + raster
            drop = torch.zeros(int(real.sum()), dtype=torch.bool)
            drop[visual] = True
            drop[visual[sel.keep[j]]] = False
            keep = (~drop).nonzero().flatten()
            n = int(real.sum())
            with torch.no_grad():
                ref = run_layers(model, emb[img][real][None], torch.ones(1, n, dtype=torch.long), torch.arange(n)[None], {point.layer: keep[None]})[0]
            torch.testing.assert_close(pruned[img, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-5)


# 3. batch equivalence ------------------------------------------------------------------------------
@methods
def test_batch_equivalence(name):
    if not METHODS[name]["batch"]:
        pytest.skip(f"{name} draws from one generator per forward: batch and single runs differ by design")
    model = model_for()
    inputs = next_batch(TEXTS, SIZES, seed=2)
    with vlmprune.wrap(model, name, budget=BUDGET):
        assert_batch_equals_single(model, inputs)


def assert_batch_equals_single(model, inputs):
    """The wrapped model's last logits and greedy tokens for the batch ``inputs`` (built from
    ``TEXTS``, ``SIZES``, seed 2) equal those of each prompt run alone."""
    batched_logits, batched_tokens = forward(model, inputs)[:, -1], generate(model, inputs)
    for i in range(len(TEXTS)):
        one = single(inputs, i, TEXTS, SIZES, seed=2)
        torch.testing.assert_close(forward(model, one)[0, -1], batched_logits[i], atol=1e-4, rtol=1e-4)
        assert torch.equal(generate(model, one)[0], batched_tokens[i])


# 4. cache equivalence ------------------------------------------------------------------------------
@methods
def test_cache_equivalence(name):
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2], seed=3)
    with vlmprune.wrap(model, name, budget=BUDGET) as handle:
        with record_selections(handle) as seen:
            cached = generate(model, inputs, steps=3)
    method = handle.method
    if any(rec[0].stage == "llm" for rec in seen):  # the prompt grows every step: replay the prefill's choices
        handle = vlmprune.wrap(model, Replay(seen, method.positions, method.llm_positions), budget=BUDGET)
    else:
        handle = vlmprune.wrap(model, name, budget=BUDGET)
    with handle:
        assert torch.equal(greedy_no_cache(model, inputs, 3), cached)


# 6. unwrap restores ------------------------------------------------------------------------------
def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# the hooks are the adapter's: one method per kind (projector with encoder captures, llm, both)
@pytest.mark.parametrize("name", ["hiprune", "fastv", "todre", "flowcut"])
def test_unwrap_restores(name):
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2], seed=4)
    ref = forward(model, inputs)
    before = _hooks(model)  # after a forward: transformers adds its output-capturing hooks at the first one
    handle = vlmprune.wrap(model, name, budget=0.1, **({"interval": 1} if name == "flowcut" else {}))
    assert _hooks(model) > before
    pruned = forward(model, inputs)
    assert pruned.shape[1] < ref.shape[1] or name == "fastv"
    handle.unwrap()
    assert _hooks(model) == before
    assert "get_image_features" not in vars(model.model)
    torch.testing.assert_close(forward(model, inputs), ref, atol=0, rtol=0)


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
                forward(model, single(inputs, i, TEXTS, SIZES, seed=5))
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
# flowcut with interval=1 prunes before blocks 1 and 2 (an entropy-adaptive count, then half the
# image's budget per crop) and keeps the budget before LLM layer 2 (the official NeXT path);
# llm_stage="off": the encoder reaches each crop's share of the budget
ENCODER = {
    "flowcut": ("flowcut", dict(interval=1)),
    "flowcut-per-image": ("flowcut", dict(interval=1, count="per_image")),
    "flowcut-encoder-only": ("flowcut", dict(interval=1, llm_stage="off")),
    "fixed-encoder": ("fixed", dict(stage="encoder", layer=1, indices=tuple(range(0, N, 3)))),
}
encoder_methods = pytest.mark.parametrize("row", list(ENCODER))


def wrap_encoder(model, row, budget, **extra):
    name, options = ENCODER[row]
    return vlmprune.wrap(model, name, budget=budget, **{**options, **extra})


@encoder_methods
def test_encoder_keep_all(row):
    """A full budget keeps every crop's whole grid in the tower (a tile's share covers its
    un-padded tokens): the unwrapped model's logits and tokens."""
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2])
    if "ref" not in _REF:
        _REF["ref"] = forward(model, inputs), generate(model, inputs)
    ref_logits, ref_tokens = _REF["ref"]
    extra = {"indices": tuple(range(N))} if row == "fixed-encoder" else {"next_packing": "adapter"}  # FlowCut: see ADAPTER_PACKING
    with wrap_encoder(model, row, 1.0, **extra) as handle:
        torch.testing.assert_close(forward(model, inputs), ref_logits, atol=1e-5, rtol=0)
        assert torch.equal(generate(model, inputs), ref_tokens)
    assert handle.stats["llm_visual_tokens"] == TOTALS[:2]


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
            slots = _kept_slots(lay[i], kept, sorted(r for c, r in kept if c == 0))
            tokens.append(slot_feats[slots])
            counts.append(len(kept))
        embeds, mask, pos = pruned_prompt(model, inputs, tokens)
        ref = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
    assert handle.stats["llm_visual_tokens"] == counts
    for i in range(n_img):
        n = int(mask[i].sum())
        torch.testing.assert_close(pruned[i, -n:], ref[i, -n:], atol=1e-5, rtol=1e-5)


@encoder_methods
def test_encoder_batch(row):
    """Images with 5 and 3 crops, left padding: the same as one by one (the tower runs per image
    and crop share, so FlowCut's batch-max count is over one image's crops)."""
    model = model_for()
    inputs = next_batch(TEXTS, SIZES, seed=2)
    with wrap_encoder(model, row, BUDGET):
        assert_batch_equals_single(model, inputs)


@encoder_methods
def test_encoder_cache(row):
    model = model_for()
    inputs = next_batch(TEXTS[:2], SIZES[:2], seed=3)
    with wrap_encoder(model, row, BUDGET):
        cached = generate(model, inputs, steps=3)
        assert torch.equal(greedy_no_cache(model, inputs, 3), cached)


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
