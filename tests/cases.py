"""The conformance kit's data (CORE-V2.md "One conformance kit"): one :class:`AdapterCase` per
adapter family and :data:`EXPECT`, the expectation table that tests/test_conformance.py runs
the truth oracles of DESIGN.md over (cases x registered methods).

A case builds its tiny random model once per session, makes its inputs (left-padded batches of
different prompts and images), runs the forward, ``generate`` and the no-cache greedy loop, and
owns the *manual reference*: the pruned logits rebuilt by hand with the unwrapped model's own
modules from the selections the method recorded. A new family costs one case class.

A row of :data:`EXPECT` says what each oracle expects of one registered method (extra rows run
a method with other options). A property that does not hold is written as the reason why, never
as a bare False; family exceptions carry their reason too, and the tests skip with it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

import vlmprune
from tests.tiny import (
    IMAGE_TOKEN,
    PAD,
    QWEN_IMAGE,
    VOCAB,
    batch,
    n_patches,
    qwen_batch,
    tiny_llava,
    tiny_qwen,
)
from tests.truth import (
    greedy_no_cache,
    manual_encoder_features,
    manual_llm_prune,
    manual_multistage,
    positions_from_mask,
    pruned_prompt,
    run_layers,
    vision_features,
)
from vlmprune.budget import equal_split
from vlmprune.methods.atp import ThresholdHeads
from vlmprune.methods.covipal import PPM

#: the oracles of DESIGN.md run by the kit (5, planted examples per method, live in
#: tests/test_methods*.py; the kit checks determinism under the seed and exact counts)
ORACLES = ("keep_all", "manual", "batch", "cache", "determinism", "unwrap")

_MODELS: dict[str, torch.nn.Module] = {}


class AdapterCase:
    """One adapter family (or tower/attention variant) under the oracles.

    ``full_budget`` keeps every visual token; ``budget`` is the pruning budget of the manual,
    batch, cache and determinism oracles, ``unwrap_budget`` that of the unwrap oracle;
    ``full_counts`` are the visual tokens the LLM sees at ``full_budget`` for ``inputs(2)``.
    ``steps`` / ``cache_steps``: new tokens of the keep-all and batch / cache oracles."""

    id: str
    family: str
    image_token: int = IMAGE_TOKEN
    has_cls: bool = True
    position_ids: bool = True  # the forward passes positions counted from the padding mask
    has_generate: bool = True
    variant: bool = False  # a tower, attention or version variant of its family's first case
    batch_rows: int = 3
    full_budget: int | float = 1.0
    budget: int | float = 0.25
    unwrap_budget: int | float = 8
    full_counts: list[int] = []
    steps: int = 4
    cache_steps: int = 5
    dense_output: bool = False  # the output has a row per input token whatever is pruned (a dense head)

    def build(self) -> torch.nn.Module:
        raise NotImplementedError

    def model(self) -> torch.nn.Module:
        """The case's tiny model, built once per session (every test file shares it)."""
        if self.id not in _MODELS:
            _MODELS[self.id] = self.build()
        return _MODELS[self.id]

    def inputs(self, n: int, seed: int) -> dict:
        """A left-padded batch of the first ``n`` prompts, images drawn from ``seed``."""
        raise NotImplementedError

    def single(self, inputs: dict, i: int, seed: int) -> dict:
        """Row ``i`` of ``inputs(n, seed)`` alone (the same pixels)."""
        raise NotImplementedError

    def forward(self, model, inputs) -> torch.Tensor:
        extra = {"position_ids": positions_from_mask(inputs["attention_mask"])} if self.position_ids else {}
        with torch.no_grad():
            return model(**inputs, **extra).logits

    def generate(self, model, inputs, steps: int | None = None) -> torch.Tensor:
        steps = steps or self.steps
        out = model.generate(
            **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, suppress_tokens=[self.image_token]
        )
        return out[:, inputs["input_ids"].shape[1] :]

    def no_cache(self, model, inputs, steps: int) -> torch.Tensor:
        return greedy_no_cache(model, inputs, steps, self.image_token, self.position_ids)

    def assert_batch_equals_single(self, model, inputs, seed: int) -> None:
        """The last logits (atol 1e-4) and greedy tokens of the batch ``inputs`` (built with
        ``seed``) equal those of each prompt run alone."""
        batched_logits, batched_tokens = self.forward(model, inputs)[:, -1], self.generate(model, inputs)
        for i in range(inputs["input_ids"].shape[0]):
            one = self.single(inputs, i, seed)
            torch.testing.assert_close(self.forward(model, one)[0, -1], batched_logits[i], atol=1e-4, rtol=1e-4)
            assert torch.equal(self.generate(model, one)[0], batched_tokens[i])

    def visual_counts(self, handle) -> list[int]:
        """The visual tokens per image that the model's consumer (the LLM) saw in the last forward."""
        return handle.stats["llm_visual_tokens"]

    def assert_unpatched(self, model) -> None:
        """Nothing of the wrap is left on the model (beyond hooks, counted by the oracle)."""
        assert "get_image_features" not in vars(model.model)
        assert not hasattr(model, "_vlmprune_handle")

    def restriction(self, row: str, oracle: str) -> str | None:
        """Why this case does not run ``oracle`` on ``row`` (None: it does)."""
        if oracle == "determinism" and self.variant:
            return "determinism is the method's own: checked on the first case of each family"
        return None

    def options(self, row: str, oracle: str) -> dict:
        """The row's method options on this case for ``oracle``."""
        spec = EXPECT[row]
        return dict(spec.options(self, oracle)) if callable(spec.options) else dict(spec.options)

    def can_replay(self, seen) -> bool:
        """Whether :class:`tests.truth.Replay` reproduces every point in ``seen``."""
        return True

    def replay_positions(self, method) -> tuple[str, str]:
        """``(positions, llm_positions)`` for :class:`tests.truth.Replay` of ``method``'s choices."""
        return method.positions, method.llm_positions

    def fixed_options(self, oracle: str) -> dict:
        """Options of the ``fixed`` row: an index set this case's images all hold."""
        raise NotImplementedError

    def manual(self, model, inputs, handle, seen, pruned) -> None:
        """Assert that ``pruned`` (logits of ``inputs`` under ``handle``, whose selections are
        ``seen``) equals the unwrapped model's on inputs pruned by hand."""
        raise NotImplementedError


# -- LLaVA -----------------------------------------------------------------------------------------
class LlavaCase(AdapterCase):
    """LLaVA with a CLIP, SigLIP (no CLS) or DINOv2 tower, SDPA or eager attention: 256 patches
    per 64 x 64 image, 4 LLM layers. Eager changes only the LLM's attention kernel, so it runs
    the rows with points inside the LLM (where the adapter gathers 4-D masks) and one projector
    row."""

    family = "llava"
    texts = [[10, 11, 12, 13, 14], [20, 21], [30, 31, 32]]
    full_budget = n_patches()
    full_counts = [n_patches()] * 2
    budget = 24
    eager_rows = frozenset({"divprune", "fastv", "todre", "vflowopt", "feather", "transprune", "adatoken3d", "atp", "atp_learned", "sparsevlm"})

    def __init__(self, tower: str = "clip", attn: str = "sdpa"):
        self.tower, self.attn = tower, attn
        self.id = f"llava-{tower}-{attn}"
        self.has_cls = tower != "siglip"
        self.variant = (tower, attn) != ("clip", "sdpa")

    def build(self):
        return tiny_llava(self.tower, self.attn)

    def inputs(self, n, seed):
        return batch(self.texts[:n], seed=seed)

    def single(self, inputs, i, seed):
        one = batch([self.texts[i]], seed=seed)
        one["pixel_values"] = inputs["pixel_values"][i : i + 1]
        return one

    def restriction(self, row, oracle):
        if self.attn == "eager" and row not in self.eager_rows:
            return "eager differs from SDPA only inside the LLM: run for methods with llm points and one projector method"
        return super().restriction(row, oracle)

    def fixed_options(self, oracle):
        step = 1 if oracle == "keep_all" else 11  # 24 of 256 tokens
        return {"indices": tuple(range(0, n_patches(), step))}

    def manual(self, model, inputs, handle, seen, pruned):
        with torch.no_grad():
            if all(rec[0].stage == "encoder" for rec in seen):  # encoder points: rerun the tower by hand per image
                tokens = []
                for i in range(inputs["pixel_values"].shape[0]):
                    keeps = [(rec[0].layer, rec[2].keep[rec.images.index(i)]) for rec in seen if i in rec.images]
                    feats = manual_encoder_features(model, inputs["pixel_values"][i : i + 1], keeps)
                    tokens.append(model.model.multi_modal_projector(feats))
                _assert_rows(pruned, model, *pruned_prompt(model, inputs, tokens))
                return
            if len(seen) > 1:  # a multi-point method: rebuild every row by hand through all its points
                refs = manual_multistage(
                    model, inputs, seen, lambda sel: projected_by_hand(model, inputs, sel),
                    renumber=handle.method.llm_positions == "compact",
                )
                for i, ref in enumerate(refs):
                    torch.testing.assert_close(pruned[i, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-5)
                return
            ((point, _, sel),) = seen
            if point.stage == "projector":
                embeds, mask, pos = pruned_prompt(model, inputs, projected_by_hand(model, inputs, sel))
                if handle.method.positions == "original":  # kept tokens keep their positions (CoViPAL)
                    pos = original_positions(inputs, sel, mask)
                _assert_rows(pruned, model, embeds, mask, pos)
                return
            ids = inputs["input_ids"]
            keep_pos = []
            for i in range(ids.shape[0]):
                img = (ids[i] == IMAGE_TOKEN).nonzero().flatten()
                others = (ids[i] != IMAGE_TOKEN).nonzero().flatten()
                keep_pos.append(torch.sort(torch.cat([others, img[sel.keep[i]]])).values)
            ref = manual_llm_prune(model, inputs, point.layer, torch.stack(keep_pos))
        torch.testing.assert_close(pruned, ref, atol=1e-5, rtol=1e-5)


def _assert_rows(pruned, model, embeds, mask, pos):
    """The unwrapped model on the hand-pruned prompt gives ``pruned``'s logits (rows are
    right-aligned in both; the real tokens of each row are compared)."""
    ref = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
    for i in range(ref.shape[0]):
        n = int(mask[i].sum())
        torch.testing.assert_close(pruned[i, -n:], ref[i, -n:], atol=1e-5, rtol=1e-5)


def projected_by_hand(model, inputs, sel) -> list[torch.Tensor]:
    """LLaVA: each image's tokens after a projector-point selection, in LLM space: the kept
    feature-layer patches (or the method's merged values), CLS and extra tokens where the
    selection adds them, through the unwrapped projector; values given in LLM space (VFlowOpt)
    replace the kept tokens after it."""
    feats, cls = vision_features(model, inputs["pixel_values"])
    proj = model.model.multi_modal_projector
    out = []
    for i, (keep, merged, extra) in enumerate(sel.per_image()):
        in_llm = merged is not None and sel.merged_space == "projected"
        rows = feats[i, keep] if merged is None or in_llm else merged
        parts = ([cls[i : i + 1]] if sel.keep_cls else []) + [rows] + ([extra] if extra is not None else [])
        mapped = proj(torch.cat(parts))
        if in_llm:
            at = int(sel.keep_cls)
            mapped = torch.cat([mapped[:at], merged, mapped[at + merged.shape[0] :]])
        out.append(mapped)
    return out


def original_positions(inputs, sel, new_mask) -> torch.Tensor:
    """Position ids of a projector-point selection that keeps original positions: each row's
    text tokens and kept image tokens at their unpruned positions, right-aligned like
    ``pruned_prompt``'s rows (padding at 0)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pos = torch.zeros_like(new_mask)
    for i, (keep, _, _) in enumerate(sel.per_image()):
        row_ids = ids[i][mask[i].bool()]
        full = torch.arange(row_ids.shape[0])
        img = (row_ids == IMAGE_TOKEN).nonzero().flatten()
        start, end = int(img[0]), int(img[-1]) + 1
        kept = torch.cat([full[:start], full[start + keep], full[end:]])
        pos[i, pos.shape[1] - kept.shape[0] :] = kept
    return pos


# -- LLaVA-NeXT ------------------------------------------------------------------------------------
class NextCase(AdapterCase):
    """LLaVA-NeXT: CLIP tower 32 px / patch 4 (8 x 8 tokens per crop), grid pinpoints 32x64,
    64x32, 64x64, so an image is a base crop plus 2 or 4 tiles, with un-padding cutting rows or
    columns of the tile grid. Images of different sizes (5 and 3 crops) in one left-padded batch;
    ``pixel_values`` 5-D, padded to the most crops, as the processor returns them. Methods whose
    default follows their official NeXT packing (``next_packing``) run the adapter's general
    rule in the keep-all and manual oracles (the official packings are checked by hand in
    tests/test_next_official_packing.py); batch, cache and unwrap run the defaults."""

    id = family = "next"
    SIDE, PATCH = 32, 4
    N = (SIDE // PATCH) ** 2  # tokens per crop
    PINPOINTS = [[32, 64], [64, 32], [64, 64]]
    # (height, width): 2x2 tiles with columns cut (224 visual tokens + 16 newlines), 1x2 tiles
    # with rows cut (160 + 6), 1x2 tiles with columns cut (128 + 8)
    SIZES = [(64, 40), (24, 64), (32, 32)]
    TOTALS = [224, 160, 128]
    CROPS = [5, 3, 3]
    TEXTS = [[10, 11, 12, 13, 14], [20, 21], [30, 31, 32]]
    full_counts = TOTALS[:2]  # newline tokens are not counted
    unwrap_budget = 0.1
    steps = cache_steps = 3

    def build(self):
        torch.manual_seed(0)
        vision = CLIPVisionConfig(
            image_size=self.SIDE, patch_size=self.PATCH, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, projection_dim=32,
        )
        text = LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
        )
        config = LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
            vision_feature_select_strategy="default", image_grid_pinpoints=self.PINPOINTS,
        )
        model = LlavaNextForConditionalGeneration(config).eval()
        model.set_attn_implementation("sdpa")
        return model

    def layout(self, model, sizes) -> list[torch.Tensor]:
        """Per image, what each placeholder slot holds in the unwrapped model: ``crop * N +
        raster`` or -1 for a newline (an id tensor packed by transformers' own
        ``pack_image_features``)."""
        crops = [self.CROPS[self.SIZES.index(tuple(s))] for s in sizes]
        ids = [torch.arange(k * self.N, dtype=torch.float64).view(k, self.N, 1) for k in crops]
        newline = torch.tensor([-1.0], dtype=torch.float64)
        packed, _ = model.model.pack_image_features(ids, torch.tensor(sizes), "default", image_newline=newline)
        return [p[:, 0].long() for p in packed]

    def next_batch(self, texts, sizes, seed=0, images_per_row=None) -> dict:
        """``[BOS] [image] text`` per row (or several images per row, separated by tokens 40,
        41, ...), left padding."""
        gen = torch.Generator().manual_seed(seed)
        crops = [self.CROPS[self.SIZES.index(s)] for s in sizes]
        lengths = [len(lay) for lay in self.layout(self.model(), sizes)]  # placeholder tokens per image
        images_per_row = images_per_row or [1] * len(texts)
        rows, at = [], 0
        for text, n_img in zip(texts, images_per_row):
            row = [1]
            for j in range(n_img):
                row += [IMAGE_TOKEN] * lengths[at] + ([40 + j] if j + 1 < n_img else [])
                at += 1
            rows.append(row + text)
        longest = max(map(len, rows))
        pixels = torch.zeros(len(sizes), max(crops), 3, self.SIDE, self.SIDE)
        for i, k in enumerate(crops):
            pixels[i, :k] = torch.randn(k, 3, self.SIDE, self.SIDE, generator=gen)
        return {
            "input_ids": torch.tensor([[PAD] * (longest - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows]),
            "pixel_values": pixels,
            "image_sizes": torch.tensor(sizes),
        }

    def inputs(self, n, seed):
        return self.next_batch(self.TEXTS[:n], self.SIZES[:n], seed=seed)

    def single(self, inputs, i, seed):
        one = self.next_batch([self.TEXTS[i]], [self.SIZES[i]], seed=seed)
        one["pixel_values"] = inputs["pixel_values"][i : i + 1, : self.CROPS[i]]
        return one

    def options(self, row, oracle):
        options = super().options(row, oracle)
        offered = vlmprune.get_method(EXPECT[row].method).options()
        if oracle in ("keep_all", "manual") and "next_packing" in offered:
            options.setdefault("next_packing", "adapter")
        return options

    def can_replay(self, seen):
        return all(rec[0].stage != "encoder" for rec in seen)  # per-crop encoder calls are not replayed

    def fixed_options(self, oracle):
        step = 1 if oracle == "keep_all" else 3
        return {"stage": "encoder", "layer": 1, "indices": tuple(range(0, self.N, step))}

    def kept_slots(self, slot_ids, kept: set[tuple[int, int]], base_order: list[int]) -> torch.Tensor:
        """Slots of one image kept by hand: the base image's chosen tokens in the method's order
        (base slot ``r`` holds raster ``r``), then the chosen tile tokens in slot order and the
        newline of each tile row that keeps a token."""
        n = self.N
        base = int(((slot_ids >= 0) & (slot_ids < n)).long().cumprod(0).sum())
        assert torch.equal(slot_ids[:base], torch.arange(n))
        keep, row = list(base_order), []
        for s, g in enumerate(slot_ids.tolist()):
            if s < base:
                continue
            if g >= 0 and (g // n, g % n) in kept:
                keep.append(s)
                row.append(s)
            elif g < 0:
                if row:
                    keep.append(s)
                row = []
        return torch.tensor(keep)

    def manual(self, model, inputs, handle, seen, pruned):
        """A projector point (per crop, or per whole image for HoloV): the packed features of the
        kept tokens and newlines, rebuilt by :meth:`kept_slots`; or one llm point: the unkept
        visual tokens (not newlines) dropped before layer K, original positions."""
        n, lay = self.N, self.layout(model, self.SIZES[:2])
        with torch.no_grad():
            full = list(model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output)
        if seen[0][0].stage == "projector":
            assert {rec[0].stage for rec in seen} == {"projector"}
            first_crop = [0, self.CROPS[0]]
            kept, base_order = [set(), set()], [[], []]
            for rec in seen:
                _, token_index, sel = rec
                for j, key in enumerate(rec.images):
                    if key < 2:  # a whole image (HoloV): token ids crop * N + raster, in packed order
                        assert torch.equal(token_index[j], lay[key][lay[key] >= 0])
                        for k in sel.keep[j].tolist():
                            c, r = divmod(int(token_index[j, k]), n)
                            kept[key].add((c, r))
                            if c == 0:
                                base_order[key].append(r)
                        continue
                    g = key - 2  # crop keys are the crop index plus the number of images
                    img = 0 if g < first_crop[1] else 1
                    c = g - first_crop[img]
                    valid = sorted({int(x) % n for x in lay[img].tolist() if x >= 0 and x // n == c})
                    for k in sel.keep[j].tolist():
                        kept[img].add((c, valid[int(token_index[j, k])]))
                        if c == 0:
                            base_order[img].append(valid[int(token_index[j, k])])
            tokens = [full[i][self.kept_slots(lay[i], kept[i], base_order[i])] for i in range(2)]
            budgets = [round(self.budget * t) for t in self.TOTALS[:2]]
            if handle.method.name == "hiprune":  # equal shares per crop (its NeXT code), the remainder dropped
                sizes = [[int(((lay_i >= 0) & (lay_i // n == c)).sum()) for c in range(k)] for lay_i, k in zip(lay, self.CROPS[:2])]
                budgets = [sum(equal_split(b, s)) for b, s in zip(budgets, sizes)]
            assert handle.stats["llm_visual_tokens"] == [len(k) for k in kept] == budgets
            with torch.no_grad():
                _assert_rows(pruned, model, *pruned_prompt(model, inputs, tokens))
            return
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
                length = int(real.sum())
                with torch.no_grad():
                    ref = run_layers(model, emb[img][real][None], torch.ones(1, length, dtype=torch.long), torch.arange(length)[None], {point.layer: keep[None]})[0]
                torch.testing.assert_close(pruned[img, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-5)


# -- Qwen2-VL / Qwen2.5-VL -------------------------------------------------------------------------
class QwenCase(AdapterCase):
    """Qwen2-VL or Qwen2.5-VL: images of 16 x 16 and 12 x 16 patches (64 and 48 merged tokens)
    in one left-padded batch; 3-D M-RoPE positions computed by the model; no CLS token."""

    family = "qwen"
    image_token = QWEN_IMAGE
    has_cls = False
    position_ids = False
    TEXTS = [[10, 11, 12, 13], [20, 21]]
    GRIDS = [(16, 16), (12, 16)]
    batch_rows = 2
    full_counts = [64, 48]

    def __init__(self, version: str):
        self.version = version
        self.id = f"qwen{version}"
        self.variant = version != "2"

    def build(self):
        return tiny_qwen(self.version)

    def inputs(self, n, seed):
        return qwen_batch(self.TEXTS[:n], self.GRIDS[:n], seed=seed)

    def single(self, inputs, i, seed):
        one = qwen_batch([self.TEXTS[i]], [self.GRIDS[i]], seed=seed)
        start = sum(h * w for h, w in self.GRIDS[:i])
        one["pixel_values"] = inputs["pixel_values"][start : start + self.GRIDS[i][0] * self.GRIDS[i][1]]
        return one

    def replay_positions(self, method):
        return "original", "original"  # 3-D positions are gathered, never renumbered

    def fixed_options(self, oracle):
        return {"indices": tuple(range(0, 48, 4))}  # 12 tokens both images hold

    def _unpruned(self, model, inputs):
        """(3-D positions, LLM input embeddings with every image token) of the unwrapped model."""
        core = model.model
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        pos, _ = core.get_rope_index(ids, image_grid_thw=inputs["image_grid_thw"], attention_mask=mask, mm_token_type_ids=inputs["mm_token_type_ids"])
        feats = torch.cat(list(core.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output))
        return pos, core.get_input_embeddings()(ids).masked_scatter((ids == QWEN_IMAGE)[..., None], feats)

    def manual(self, model, inputs, handle, seen, pruned):
        """One projector point: the prompt with the dropped image tokens removed by hand (kept
        ones in the method's order) and every kept token at its original (t, h, w) position.
        Points inside the LLM (after a projector point for ToDRE and VFlowOpt, whose LLM-space
        values replace the kept tokens' features): each row through the unwrapped LLM layer by
        layer, dropping before each point the image tokens it did not keep; positions stay the
        original ones whatever the method's ``llm_positions``."""
        with torch.no_grad():
            pos, emb = self._unpruned(model, inputs)
        if all(rec[0].stage == "projector" for rec in seen) and all(rec[2].merged is None for rec in seen):
            self._manual_projector(model, inputs, handle, seen, pruned, pos, emb)
            return
        assert {rec[0].stage for rec in seen} <= {"projector", "llm"}
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for i in range(ids.shape[0]):
            real = mask[i].bool()
            row = emb[i][real].clone()
            visual = (ids[i][real] == QWEN_IMAGE).nonzero().flatten()
            length, prunes = int(real.sum()), {}
            for rec in seen:
                if i not in rec.images:
                    continue
                keep, merged, _ = rec[2].per_image()[rec.images.index(i)]
                if merged is not None:  # projector point: LLM-space values of the kept tokens
                    row[visual[keep]] = merged.to(row.dtype)
                keep = torch.sort(keep).values
                others = torch.ones(length, dtype=torch.bool)
                others[visual] = False
                kept = torch.sort(torch.cat([others.nonzero().flatten(), visual[keep]])).values
                prunes[0 if rec[0].stage == "projector" else rec[0].layer] = kept
                visual, length = torch.searchsorted(kept, visual[keep]), kept.numel()
            assert len(prunes) == len(handle.method.points(handle.adapter.info()))
            with torch.no_grad():
                ref = run_qwen_layers(model, row[None], pos[:, i : i + 1, real], prunes)
            torch.testing.assert_close(pruned[i, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-5)

    def _manual_projector(self, model, inputs, handle, seen, pruned, pos, emb):
        keeps = {}
        for _, token_index, sel in seen:  # one call per image size
            for keep in sel.keep:
                keeps.setdefault(token_index.shape[1], []).append(keep)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        rows = []
        for i in range(ids.shape[0]):
            img = (ids[i] == QWEN_IMAGE).nonzero().flatten()
            keep = keeps[img.numel()].pop(0)
            everything = torch.arange(ids.shape[1])  # the kept image tokens in the method's order (HoloV's is its own)
            rows.append(torch.cat([everything[: int(img[0])], img[keep], everything[int(img[-1]) + 1 :]]))
        embeds, new_mask, new_pos = gather_left_padded(rows, emb, mask, pos)
        with torch.no_grad():
            ref = model(inputs_embeds=embeds, attention_mask=new_mask, position_ids=new_pos).logits
        for i, r in enumerate(rows):
            n = int(mask[i, r].sum())
            torch.testing.assert_close(pruned[i, -n:], ref[i, -n:], atol=1e-5, rtol=1e-5)
        budget = [16, 12] if handle.method.name != "fixed" else [len(handle.method.indices)] * 2
        assert handle.stats["llm_visual_tokens"] == budget


def gather_left_padded(rows: list[torch.Tensor], emb, mask, pos3):
    """Qwen-VL inputs holding, for each row ``i``, the sequence positions ``rows[i]`` of
    ``emb [B, L, C]``, ``mask [B, L]`` and 3-D positions ``pos3 [3, B, L]``, left-padded to the
    longest: ``(embeds, mask, position_ids)``."""
    longest = max(r.numel() for r in rows)
    embeds = emb.new_zeros(len(rows), longest, emb.shape[-1])
    new_mask = torch.zeros(len(rows), longest, dtype=torch.long)
    new_pos = torch.zeros(3, len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        embeds[i, longest - r.numel() :] = emb[i, r]
        new_mask[i, longest - r.numel() :] = mask[i, r]
        new_pos[:, i, longest - r.numel() :] = pos3[:, i, r]
    return embeds, new_mask, new_pos


def run_qwen_layers(model, embeds, pos3, prunes: dict[int, torch.Tensor]) -> torch.Tensor:
    """One unpadded row through the unwrapped Qwen LLM, layer by layer; before layer ``K`` in
    ``prunes`` only the sequence positions ``prunes[K]`` stay, each with its own 3-D M-RoPE
    position (RoPE from the gathered positions). Returns logits ``[L', V]``."""
    lm = model.model.language_model
    hidden = embeds
    for i, layer in enumerate(lm.layers):
        if i in prunes:
            hidden, pos3 = hidden[:, prunes[i]], pos3[:, :, prunes[i]]
        cos_sin = lm.rotary_emb(hidden, pos3)
        hidden = layer(hidden, attention_mask=None, position_embeddings=cos_sin)  # causal (no padding)
    return model.lm_head(lm.norm(hidden))[0]


# -- plain ViT (the core's acceptance skeleton, adapters/vit.py) ------------------------------------
class PixelCase(AdapterCase):
    """A case whose model takes ``pixel_values`` only (a ViT, a Vim): each image alone gives the
    batch's row (atol 1e-5)."""

    def assert_batch_equals_single(self, model, inputs, seed):
        batched = self.forward(model, inputs)
        for i in range(inputs["pixel_values"].shape[0]):
            torch.testing.assert_close(self.forward(model, self.single(inputs, i, seed))[0], batched[i], atol=1e-5, rtol=1e-5)


class ViTCase(PixelCase):
    """transformers' ViTForImageClassification, 3 blocks, 32 x 32 images of 4 x 4 patches of 8 px
    (16 patches, CLS prefix), SDPA. The oracles read the final token sequence (CLS first, after
    the final layernorm), which the classifier's CLS pooling reads, so equal sequences mean equal
    logits. Methods act at the boundary point ``vit:3`` (after the last block); no padding, no
    text, no generate()."""

    id = family = "vit"
    SIDE, PATCH, DEPTH = 32, 8, 3
    N = (SIDE // PATCH) ** 2
    full_budget = N
    full_counts = [N, N]
    budget = unwrap_budget = 6
    has_generate = False
    #: the boundary methods the ViT adapter serves: the four of issue 13's acceptance test, and
    #: HiPrune, HoloV and FoPru, which read the tower facts ViTInfo gives (has_cls, encoder_layers)
    served = frozenset({"divprune", "uniform", "random", "visionzip", "hiprune", "holov", "fopru", "tome"})

    def build(self):
        from transformers import ViTConfig, ViTForImageClassification

        torch.manual_seed(0)
        config = ViTConfig(hidden_size=32, num_hidden_layers=self.DEPTH, num_attention_heads=4, intermediate_size=64,
                           image_size=self.SIDE, patch_size=self.PATCH, num_labels=5)
        model = ViTForImageClassification(config).eval()
        model.set_attn_implementation("sdpa")
        return model

    def inputs(self, n, seed):
        return {"pixel_values": torch.randn(n, 3, self.SIDE, self.SIDE, generator=torch.Generator().manual_seed(seed))}

    def single(self, inputs, i, seed):
        return {"pixel_values": inputs["pixel_values"][i : i + 1]}

    def forward(self, model, inputs):
        with torch.no_grad():
            return model.vit(**inputs).last_hidden_state

    def visual_counts(self, handle):
        """The tokens per image after the last point (no point ran, ToMe with r=0: every patch)."""
        points = handle.stats["points"]
        return points[-1]["out"] if points else self.full_counts

    def assert_unpatched(self, model):
        assert not hasattr(model, "_vlmprune_handle")

    def restriction(self, row, oracle):
        if oracle == "cache":
            return "a ViT classifier has no generate() and no KV cache"
        if EXPECT[row].method not in self.served:
            return "on plain ViTs: the boundary methods (DivPrune, uniform, random, VisionZip, HiPrune, HoloV, FoPru) and ToMe; the README lists why the others cannot run there"
        return None

    def manual(self, model, inputs, handle, seen, pruned):
        """The unwrapped model's own modules run by hand: embeddings, the blocks before the point,
        the CLS token then each image's kept patches (or the method's merged values, and tokens
        it adds), the remaining blocks, the final layernorm."""
        ((point, _, sel),) = seen
        vit = model.vit
        with torch.no_grad():
            hidden = vit.embeddings(inputs["pixel_values"])
            for block in vit.layers[: point.layer]:
                hidden = block(hidden)
            rows = []
            for i, (keep, merged, extra) in enumerate(sel.per_image()):
                parts = [hidden[i, :1], hidden[i, 1:][keep] if merged is None else merged]
                rows.append(torch.cat(parts + ([extra] if extra is not None else [])))
            hidden = torch.stack(rows)
            for block in vit.layers[point.layer :]:
                hidden = block(hidden)
            ref = vit.layernorm(hidden)
        torch.testing.assert_close(pruned, ref, atol=1e-5, rtol=1e-5)


class TowerCase(ViTCase):
    """A timm or open_clip ViT (adapters/vit.py ``FLAVOURS``) under the same oracles as
    :class:`ViTCase`: 3 blocks, 32 x 32 images of 16 patches. :meth:`forward` returns the head's
    output and the final token sequence (flattened, one row per image), both from one forward;
    :meth:`manual` rebuilds them with the model's own modules (:meth:`embed`, ``blocks``,
    :meth:`finish`), the ``prefix`` tokens (CLS, registers) always kept."""

    variant = True
    prefix = 1

    def blocks(self, model):
        raise NotImplementedError

    def embed(self, model, pixels):
        raise NotImplementedError

    def finish(self, model, hidden) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, model, inputs):
        with torch.no_grad():
            return self.finish(model, self.run(model, inputs["pixel_values"]))

    def run(self, model, pixels):
        raise NotImplementedError

    def manual(self, model, inputs, handle, seen, pruned):
        ((point, _, sel),) = seen
        p = self.prefix
        with torch.no_grad():
            hidden = self.embed(model, inputs["pixel_values"])
            for block in self.blocks(model)[: point.layer]:
                hidden = block(hidden)
            rows = []
            for i, (keep, merged, extra) in enumerate(sel.per_image()):
                parts = [hidden[i, :p], hidden[i, p:][keep] if merged is None else merged]
                rows.append(torch.cat(parts + ([extra] if extra is not None else [])))
            hidden = torch.stack(rows)
            for block in self.blocks(model)[point.layer :]:
                hidden = block(hidden)
            ref = self.finish(model, hidden)
        torch.testing.assert_close(pruned, ref, atol=1e-5, rtol=1e-5)


class TimmCase(TowerCase):
    """timm's ``VisionTransformer`` with LayerScale (``init_values``) and two register tokens:
    ``pool="token"`` (CLS + registers, prefix 3) or ``pool="avg"`` (no CLS, registers only,
    prefix 2; the head reads the mean of the kept patches after ``fc_norm``)."""

    family = "vit"

    def __init__(self, pool: str):
        self.pool = pool
        self.id = f"vit-timm-{pool}"
        self.has_cls = pool == "token"
        self.prefix = 3 if self.has_cls else 2

    def build(self):
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        model = VisionTransformer(img_size=self.SIDE, patch_size=self.PATCH, embed_dim=32, depth=self.DEPTH, num_heads=4,
                                  mlp_ratio=2.0, num_classes=5, reg_tokens=2, init_values=0.5, global_pool=self.pool,
                                  class_token=self.has_cls).eval()
        with torch.no_grad():  # registers and CLS away from their zero/small init
            for name in ("reg_token", "cls_token"):
                if getattr(model, name, None) is not None:
                    getattr(model, name).normal_()
        return model

    def blocks(self, model):
        return model.blocks

    def embed(self, model, pixels):
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixels))))

    def run(self, model, pixels):
        return model.blocks(self.embed(model, pixels))

    def finish(self, model, hidden):
        hidden = model.norm(hidden)
        return torch.cat([model.forward_head(hidden), hidden.flatten(1)], dim=1)

    def forward(self, model, inputs):
        with torch.no_grad():
            hidden = model.forward_features(inputs["pixel_values"])
            return torch.cat([model.forward_head(hidden), hidden.flatten(1)], dim=1)


class OpenClipCase(TowerCase):
    """open_clip's ``VisionTransformer`` (``nn.MultiheadAttention``, LayerScale), CLS pooling after
    ``ln_post`` and the ``proj`` projection, ``output_tokens`` on: boundary ``vit:3`` prunes the
    last block's output (no norm over the whole sequence inside the tower's blocks)."""

    id = "vit-open-clip"
    family = "vit"

    def build(self):
        from open_clip.transformer import VisionTransformer

        torch.manual_seed(0)
        return VisionTransformer(image_size=self.SIDE, patch_size=self.PATCH, width=32, layers=self.DEPTH, heads=4,
                                 mlp_ratio=2.0, output_dim=16, ls_init_value=0.5, output_tokens=True).eval()

    def blocks(self, model):
        return model.transformer.resblocks

    def embed(self, model, pixels):
        return model._embeds(pixels)

    def finish(self, model, hidden):
        pooled, tokens = model._pool(hidden)
        return torch.cat([pooled @ model.proj, tokens.flatten(1)], dim=1)

    def forward(self, model, inputs):
        with torch.no_grad():
            pooled, tokens = model(inputs["pixel_values"])
            return torch.cat([pooled, tokens.flatten(1)], dim=1)


class HFTowerCase(TowerCase):
    """transformers' ``CLIPVisionModel`` (prefix CLS; no norm over the sequence, so ``vit:3``
    prunes the last layer's output), ``SiglipVisionModel`` (no CLS; attention-pooling head) or
    ``Dinov2Model`` (CLS, final layernorm): :meth:`forward` returns ``pooler_output`` and the
    flattened ``last_hidden_state``."""

    family = "vit"

    def __init__(self, tower: str):
        self.tower = tower
        self.id = f"vit-hf-{tower}"
        self.has_cls = tower != "siglip"
        self.prefix = int(self.has_cls)

    def build(self):
        import transformers as T

        classes = {"clip": (T.CLIPVisionModel, T.CLIPVisionConfig), "siglip": (T.SiglipVisionModel, T.SiglipVisionConfig),
                   "dinov2": (T.Dinov2Model, T.Dinov2Config)}
        model_cls, config_cls = classes[self.tower]
        torch.manual_seed(0)
        return model_cls(config_cls(hidden_size=32, num_hidden_layers=self.DEPTH, num_attention_heads=4, intermediate_size=64,
                                    patch_size=self.PATCH, image_size=self.SIDE)).eval()

    def _tower(self, model):
        return getattr(model, "vision_model", model)

    def blocks(self, model):
        def call(layer):
            def run(hidden):
                out = layer(hidden) if self.tower == "dinov2" else layer(hidden, None)
                return out[0] if isinstance(out, tuple) else out

            return run

        tower = self._tower(model)
        return [call(layer) for layer in (tower.encoder.layers if self.tower != "dinov2" else tower.encoder.layer)]

    def embed(self, model, pixels):
        tower = self._tower(model)
        hidden = tower.embeddings(pixels)
        return tower.pre_layrnorm(hidden) if self.tower == "clip" else hidden

    def finish(self, model, hidden):
        tower = self._tower(model)
        if self.tower == "clip":
            pooled = tower.post_layernorm(hidden[:, 0])
        elif self.tower == "siglip":
            hidden = tower.post_layernorm(hidden)
            pooled = tower.head(hidden)
        else:
            hidden = tower.layernorm(hidden)
            pooled = hidden[:, 0]
        return torch.cat([pooled, hidden.flatten(1)], dim=1)

    def forward(self, model, inputs):
        with torch.no_grad():
            out = model(**inputs)
        return torch.cat([out.pooler_output, out.last_hidden_state.flatten(1)], dim=1)


def segmenter(backbone, head):
    """A plain-ViT segmenter the adapter serves (its ``embedded`` flavour): ``backbone`` (timm),
    then ``head`` (a per-token :class:`vlmprune.embedded.vit.SegHead`) on the final-norm tokens,
    logits on the token grid."""
    from vlmprune.embedded.vit import EmbeddedViT

    class Segmenter(EmbeddedViT):
        def forward(self, pixel_values):
            return self.head(self.backbone.forward_features(pixel_values), size=None)

    return Segmenter(backbone, head).eval()


class DenseCase(TimmCase):
    """A segmenter with a dense head (:func:`segmenter`: a 3-block timm ViT with CLS and
    LayerScale, a per-token linear head of 4 classes): the ``vit`` stage restores every patch
    before the head (``restore="head"``). :meth:`forward` gives the head's logits per token.
    :meth:`manual` replays every recorded selection image by image on the unwrapped modules:
    kept (or merged) tokens go on through the blocks, a patch merged into a kept token takes that
    token's final state, a patch that leaves keeps the state it left with (or the method's exit
    output, DToP's early prediction), all patches return before the final norm and the head."""

    family = "vit"
    served = ViTCase.served | {"dtop"}
    dense_output = True

    def __init__(self):
        self.id = "vit-dense"
        self.has_cls = True
        self.prefix = 1

    def build(self):
        from timm.models.vision_transformer import VisionTransformer

        from vlmprune.embedded.vit import DEPTH, SegHead

        torch.manual_seed(0)
        backbone = VisionTransformer(img_size=self.SIDE, patch_size=self.PATCH, embed_dim=32, depth=self.DEPTH, num_heads=4,
                                     mlp_ratio=2.0, num_classes=0, init_values=0.5).eval()
        head = SegHead(DEPTH - 1, width=32)
        head.block = self.DEPTH - 1  # the tiny backbone's last block
        return segmenter(backbone, head)

    def forward(self, model, inputs):
        with torch.no_grad():
            return model(inputs["pixel_values"]).flatten(1)

    def options(self, row, oracle):
        """Boundary methods act before block 2: pruned after the last block, a token would come
        back to the head with the state it has anyway."""
        return {**super().options(row, oracle), "boundary_layer": 2}

    def manual(self, model, inputs, handle, seen, pruned):
        bb, p, n = model.backbone, self.prefix, self.N
        with torch.no_grad():
            for i in range(inputs["pixel_values"].shape[0]):
                x = self.embed(bb, inputs["pixel_values"][i : i + 1])[0]
                owner, left, exits = torch.arange(n), torch.zeros(n, x.shape[-1]), {}
                for layer in range(self.DEPTH + 1):
                    for rec in seen:
                        point, _, sel = rec
                        if point.layer != layer or i not in rec.images:
                            continue
                        j = rec.images.index(i)
                        keep = sel.keep[j]
                        if sel.merge_map is not None:  # a token merged into a kept one follows it (ToMe's unmerge)
                            slot = sel.merge_map[j].clone()
                        else:
                            slot = torch.full((x.shape[0] - p,), -1)
                            slot[keep] = torch.arange(keep.shape[0])
                        gone = (owner >= 0) & (slot[owner.clamp(min=0)] < 0)
                        left[gone] = x[p:][owner[gone]]
                        if sel.exit_outputs is not None:
                            exits.update({int(t): sel.exit_outputs[j][owner[t]] for t in gone.nonzero()[:, 0]})
                        owner = torch.where(owner >= 0, slot[owner.clamp(min=0)], owner)
                        body = x[p:][keep] if sel.merged is None else sel.merged[j]
                        x = torch.cat([x[:p], body])
                    if layer < self.DEPTH:
                        x = bb.blocks[layer](x[None])[0]
                full = torch.where((owner >= 0)[:, None], x[p:][owner.clamp(min=0)], left)
                tokens = bb.norm(torch.cat([x[:p], full])[None])
                logits = model.head.classifier(model.head.norm(tokens[:, 1:]))[0]
                for t, value in exits.items():
                    logits[t] = value
                ref = logits.T.reshape(-1, 4, 4).flatten()
                torch.testing.assert_close(pruned[i], ref, atol=1e-5, rtol=1e-5)


LLAVA = [LlavaCase("clip", "sdpa"), LlavaCase("clip", "eager"), LlavaCase("siglip", "sdpa"), LlavaCase("dinov2", "sdpa")]
NEXT = NextCase()
QWEN = [QwenCase("2"), QwenCase("2.5")]
VIT = ViTCase()
TOWERS = [TimmCase("token"), TimmCase("avg"), OpenClipCase(), HFTowerCase("clip"), HFTowerCase("siglip"), HFTowerCase("dinov2"), DenseCase()]
from tests.cases_vim import VimCase  # noqa: E402  (a vision Mamba; it subclasses PixelCase above)

VIM = VimCase()
from tests.cases_vla import VLACase  # noqa: E402  (an OpenVLA-style policy; it subclasses LlavaCase above)

VLA = VLACase()
from tests.cases_unet import UNetCase  # noqa: E402  (a diffusers UNet; it subclasses PixelCase above)

UNET = UNetCase()
from tests.cases_pi0 import PI0Case  # noqa: E402  (transformers' PI0 policy)

PI0 = PI0Case()
from tests.cases_retrieval import RetrievalCase  # noqa: E402  (ColPali / ColQwen2 retrievers)

RETRIEVAL = [RetrievalCase("colpali"), RetrievalCase("colqwen2")]
#: every case the kit runs
CASES: list[AdapterCase] = [*LLAVA, NEXT, *QWEN, VIT, *TOWERS, VIM, VLA, UNET, PI0, *RETRIEVAL]


# -- the expectation table -------------------------------------------------------------------------
@dataclass(frozen=True)
class Expect:
    """What the oracles expect of one row (a registered method with options). Each property
    is True or the reason it does not hold; ``skip`` maps ``(oracle or "*", family)`` to the
    reason that oracle (or every oracle) does not run on that family."""

    method: str
    options: Mapping | Callable[[AdapterCase, str], Mapping] = field(default_factory=dict)
    identity_at_full_budget: bool | str = True
    batch_independent: bool | str = True
    manual: bool | str = True
    variants: bool | str = True  # whether the row runs on a family's variant cases
    skip: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def excluded(self, oracle: str, case: AdapterCase) -> str | None:
        """Why ``oracle`` does not run this row on ``case`` at all: a family exception, or a
        variant case the row does not run on (None: it runs)."""
        why = self.skip.get((oracle, case.family)) or self.skip.get(("*", case.family))
        if not why and case.variant and self.variants is not True:
            why = self.variants
        return why

    def reason(self, oracle: str, case: AdapterCase) -> str | None:
        """:meth:`excluded`, or why the property ``oracle`` checks does not hold for this row."""
        column = {"keep_all": self.identity_at_full_budget, "batch": self.batch_independent, "manual": self.manual}.get(oracle, True)
        return self.excluded(oracle, case) or (None if column is True else column)


def random_atp_heads() -> ThresholdHeads:
    """ATP threshold heads for a 4-layer LLM (points 1, 2, 3) with random outputs."""
    gen = torch.Generator().manual_seed(0)
    heads = ThresholdHeads((1, 2, 3))
    for mlp in heads.mlps:
        with torch.no_grad():
            for p in mlp.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return heads.eval()


def tome_options(case: AdapterCase, oracle: str) -> dict:
    """ToMe's row: r=0 for keep-all, else 2 per block; proportional attention where the blocks take
    an attention mask (transformers 5.17's ``Dinov2Layer`` takes none: ``prop_attn=False`` there;
    a Vim has no attention)."""
    from vlmprune.adapters.vit import ViTAdapter

    options = {"r": 0 if oracle == "keep_all" else 2}
    if case.family == "vim":
        return options
    try:
        ViTAdapter(case.model()).tower.attention_bias()
    except ValueError:
        options["prop_attn"] = False
    return options


def dtop_options(oracle: str) -> dict:
    """DToP's row: random auxiliary heads after blocks 0 and 1, one finished token kept per
    class, p0 = 0.3 (4 classes: counts differ per image), 1.0 for keep-all (nothing exits)."""
    from vlmprune.methods.dtop import ExitHeads

    torch.manual_seed(5)
    heads = ExitHeads((0, 1), 32, 4).eval()
    with torch.no_grad():
        for param in heads.parameters():
            param.normal_()
    return {"weights": heads, "blocks": (0, 1), "keep_per_class": 1, "threshold": 1.0 if oracle == "keep_all" else 0.3}


RNG = "draws from one generator per forward: batch and single runs differ by design"
MERGES = "merges tokens by design (VisionZip and PruMerge+ also add CLS): no identity at full budget"
NEXT_MULTI = "several points on NeXT's crops: covered by keep-all, batch and cache here"
NEXT_MERGE = "merging on NeXT's crops: covered by keep-all, batch and cache here"
NEXT_ENCODER = "encoder points on NeXT's crops: rebuilt by hand in tests/test_truth_next.py::test_encoder_manual"
ONLY_NEXT = "a variant for LLaVA-NeXT's per-crop encoder (interval 1 on its 4-block tower); the plain row runs here"
NEXT_UNTESTED = "not run on LLaVA-NeXT (no NeXT path checked for it yet)"
VLA_ONLY = {("*", c.family): "a VLA method: run on the VLA case" for c in CASES if c.family != "vla"}
UNET_ONLY = {("*", c.family): "a diffusion-UNet method: run on the UNet case" for c in CASES if c.family != "unet"}
#: ToMeSD and OptiPrune: half the tokens (none for keep-all), deterministic destinations
UNET_OPTIONS = lambda case, oracle: {"ratio": 0.0 if oracle == "keep_all" else 0.5, "use_rand": False}  # noqa: E731


def _next_variant(**options) -> Expect:
    return Expect("flowcut", options={"interval": 1, **options}, skip={("*", "llava"): ONLY_NEXT, ("*", "qwen"): ONLY_NEXT, ("manual", "next"): NEXT_ENCODER})


#: one row per registered method (row id = method name), plus variant rows (their ``method``)
EXPECT: dict[str, Expect] = {
    "adatoken3d": Expect("adatoken3d", skip={("manual", "next"): NEXT_MULTI}),
    "atp": Expect("atp", skip={("*", "next"): NEXT_UNTESTED}),  # ATP-TF; per-image counts
    "atp_learned": Expect(  # learned thresholds with random heads
        "atp", options=lambda case, oracle: {"weights": random_atp_heads()},
        skip={("*", "next"): NEXT_UNTESTED, ("*", "qwen"): "learned ATP heads: run on LLaVA (the method's trained path is family-free)"},
    ),
    "covipal": Expect(  # a random PPM
        "covipal", options=lambda case, oracle: {"weights": PPM(64, seed=0)},
        skip={("*", "next"): NEXT_UNTESTED, ("*", "qwen"): "not run on Qwen-VL (no Qwen path checked for it yet)"},
    ),
    "dart": Expect("dart", identity_at_full_budget="the code's count, image pivots + pivots x (budget // pivots), can fall "
                   "short of every token (Qwen's 48-token image with 7 pivots: 46)"),
    "divprune": Expect("divprune"),
    "fastv": Expect("fastv"),
    "feather": Expect("feather", skip={("manual", "next"): NEXT_MULTI}),
    "fixed": Expect(
        "fixed", options=lambda case, oracle: case.fixed_options(oracle),
        variants="a fixed index set reads no signal of the tower: run on each family's first case",
        skip={("keep_all", "qwen"): "one index set cannot hold every token of images of 64 and 48 tokens", ("manual", "next"): NEXT_ENCODER},
    ),
    "flowcut": Expect(
        "flowcut",
        skip={
            ("batch", "llava"): "batch-max entropy count over the batch (official code default)",
            ("*", "next"): "run as the flowcut-interval1 rows (interval 1 on NeXT's 4-block tower)",
            ("manual", "qwen"): "points inside Qwen's vision tower: rebuilt by hand in tests/test_qwen_encoder.py",
        },
    ),
    "flowcut-interval1": _next_variant(),
    "flowcut-per-image": _next_variant(count="per_image"),
    "flowcut-encoder-only": _next_variant(llm_stage="off"),
    "fopru": Expect("fopru"),
    "hiprune": Expect("hiprune"),
    "holov": Expect("holov"),
    "hpc_colpali": Expect("hpc_colpali", skip={("*", c.family): "a retriever method: run on the retriever cases" for c in CASES if c.family != "retrieval"}),
    "optiprune": Expect("optiprune", options=UNET_OPTIONS, skip=UNET_ONLY),
    "prumerge_plus": Expect("prumerge_plus", identity_at_full_budget=MERGES, skip={("manual", "next"): NEXT_MERGE}),
    "random": Expect("random", batch_independent=RNG),
    "recoverable_compression": Expect("recoverable_compression", identity_at_full_budget="merges the rest into centres and a summary "
                                      "token at any budget: no identity at full budget",
                                      skip={("manual", "next"): NEXT_MERGE, ("manual", "qwen"): "a summary token on Qwen (the oracle "
                                            "here has none): rebuilt by hand in tests/test_recoverable_compression.py::test_qwen_by_hand"}),
    "tome": Expect(
        "tome", options=lambda case, oracle: tome_options(case, oracle),
        skip={("manual", "vit"): "merges inside every block: the official algorithm rebuilt by hand in tests/test_tome.py",
              **{("*", fam): "merges between attention and MLP of a plain ViT's blocks (or between a Vim's); the VLM "
                 "adapters offer no such stage" for fam in ("llava", "next", "qwen")}},
    ),
    "tomesd": Expect("tomesd", options=UNET_OPTIONS, skip=UNET_ONLY),
    "top_vim": Expect("top_vim", skip={("*", fam): "ToP-ViM prunes between the blocks of a vision Mamba (its backward-scan score); a VLM has none" for fam in ("llava", "next", "qwen")}),
    "dtop": Expect(
        "dtop", options=lambda case, oracle: dtop_options(oracle),
        skip={("*", fam): "early exit needs a ViT with a dense head: runs on the vit-dense case" for fam in ("llava", "next", "qwen", "vim")},
    ),
    "todre": Expect("todre", identity_at_full_budget="stage 2 halves the tokens inside the LLM at any budget", skip={("manual", "next"): NEXT_MULTI}),
    # manual without recycling (the kit's hand rebuild drops tokens only): recycled values by hand in tests/test_sparsevlm.py
    "sparsevlm": Expect("sparsevlm", options=lambda case, oracle: {"recycle": False} if oracle == "manual" else {},
                        skip={("manual", "next"): NEXT_MULTI}),
    "sparsevlm-v2": Expect("sparsevlm", options={"version": "2.0"}, skip={("manual", "next"): NEXT_MULTI}),
    "transprune": Expect("transprune", skip={("manual", "next"): NEXT_MULTI}),  # TTV softmax per sample (official: over the batch)
    "uniform": Expect("uniform"),
    "vflowopt": Expect(
        "vflowopt", identity_at_full_budget="recycling merges int(N/m^2) cells even at full budget",
        skip={("*", "next"): "VFlowOpt on LLaVA-NeXT has its own batch, cache and unwrap tests: tests/test_vflowopt_next.py"},
    ),
    "visionzip": Expect("visionzip", identity_at_full_budget=MERGES, skip={("manual", "next"): NEXT_MERGE}),
    # the kit's forwards are warm-up steps of one episode (nothing pruned): the temporal term runs in tests/test_vla_pruner.py
    "vla_pruner": Expect("vla_pruner", options={"use_temporal": False}, skip=VLA_ONLY),
    "vla_pruner-prefill": Expect("vla_pruner", options={"use_temporal": False, "use_prefill_attention": True}, skip=VLA_ONLY),
    "zoo_prune": Expect("zoo_prune"),  # the same directions at every call
}


def rows() -> list[str]:
    """The rows the oracles run: each registered method's rows, and a method without a row
    under its own name (every oracle then fails on it)."""
    out = []
    for entry in vlmprune.methods():
        own = [row for row, spec in EXPECT.items() if spec.method == entry["name"]]
        out += own or [entry["name"]]
    return out


def table_problems(table: Mapping[str, Expect] | None = None) -> list[str]:
    """What is wrong between :data:`EXPECT` (or ``table``) and the registry: a registered method
    without a row, a row naming a method that is not registered."""
    table = EXPECT if table is None else table
    registered = {entry["name"] for entry in vlmprune.methods()}
    named = {spec.method for spec in table.values()}
    problems = [f"registered method {m!r} has no expectation row in tests/cases.py EXPECT" for m in sorted(registered - named)]
    problems += [f"expectation row {r!r} names {spec.method!r}, which is not a registered method" for r, spec in table.items() if spec.method not in registered]
    return problems
