"""Vision-encoder attention on Qwen2-VL / Qwen2.5-VL (signal ``encoder_attention`` at the
projector stage) and the truth rows of the methods that read it (HiPrune, HoloV).

Reference for the signal: the same tiny model run with ``attn_implementation="eager"``, with
the modeling module's ``eager_attention_forward`` wrapped to record the probabilities each
vision block itself computed (one call per ``cu_seqlens`` segment: frame, or 2.5-VL window),
then mapped by hand to merged tokens (rows averaged, columns summed over each 2x2 group)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch
from vlmprune.adapters.qwen_vision import QwenTower

import vlmprune
from tests.cases import QWEN

forward = QWEN[0].forward  # logits of a Qwen-VL batch (the conformance case's)
from tests.tiny import qwen_batch, tiny_qwen
from vlmprune.context import ModelInfo, Point, Selection
from vlmprune.method import Method
from vlmprune.primitives.scoring import received_attention

VERSIONS = ["2", "2.5"]
PROBE_TEXTS = [[10, 11], [12], [13, 14, 15]]
PROBE_GRIDS = [(16, 16), (12, 16), (16, 16)]  # images 0 and 2 share one call (B = 2)

_MODELS: dict = {}


def model_for(version, attn="sdpa"):
    if (version, attn) not in _MODELS:
        model = tiny_qwen(version, attn=attn)
        if attn != "sdpa":
            model.load_state_dict(model_for(version).state_dict())
        _MODELS[version, attn] = model
    return _MODELS[version, attn]


@dataclass
class Probe(Method):
    """Test method: keeps every token and records the encoder attention of every block."""

    name = "test_qwen_probe"
    stages = ("projector",)
    needs = frozenset({"encoder_attention"})
    positions = "original"

    def capture_layers(self, info):
        return {"encoder": tuple(range(info.encoder_layers)), "llm": ()}

    def select(self, ctx):
        depth = ctx.info.encoder_layers
        self.seen.append(
            (
                list(ctx.images),
                ctx.token_index.clone(),
                {layer: ctx.signals.encoder_attention(layer=layer) for layer in range(depth)},
                ctx.signals.encoder_attention(reduce="mean"),
            )
        )
        b, n = ctx.tokens.shape[:2]
        return Selection(keep=torch.arange(n).expand(b, n))


def eager_attention(model, inputs):
    """``{block: [H, S, S]}``: the probabilities each vision block of the eager model computed
    (block-diagonal over its cu_seqlens segments, packed order)."""
    visual = model.model.visual
    module = sys.modules[type(visual.blocks[0].attn).__module__]
    original = module.eager_attention_forward
    owner = {blk.attn: i for i, blk in enumerate(visual.blocks)}
    calls: dict[int, list] = {}

    def recording(mod, *args, **kwargs):
        out, weights = original(mod, *args, **kwargs)
        if mod in owner:
            calls.setdefault(owner[mod], []).append(weights[0].detach())
        return out, weights

    module.eager_attention_forward = recording
    try:
        forward(model, inputs)
    finally:
        module.eager_attention_forward = original
    full = {}
    for block, parts in calls.items():
        s = sum(p.shape[-1] for p in parts)
        mat = parts[0].new_zeros(parts[0].shape[0], s, s)
        at = 0
        for p in parts:
            mat[:, at : at + p.shape[-1], at : at + p.shape[-1]] = p
            at += p.shape[-1]
        full[block] = mat
    return full


def by_hand(version, model, inputs, full, image):
    """One image's eager patch attention in raster order of its merge groups, ``[H, P, P]``,
    and the merged-token map ``[H, N, N]`` (rows averaged, columns summed over 2x2 groups)."""
    visual = model.model.visual
    thw = inputs["image_grid_thw"]
    counts = [int(t * h * w) // 4 for t, h, w in thw.tolist()]
    offset = sum(counts[:image])
    if version == "2.5":
        order, _ = QwenTower(visual).window_index(thw)  # packed position -> global group id
    else:
        order = torch.arange(sum(counts))
    where = torch.argsort(order)  # global group id -> packed position
    groups = where[offset : offset + counts[image]]
    rows = (groups[:, None] * 4 + torch.arange(4)).flatten()
    patches = full[:, rows][:, :, rows]
    n = counts[image]
    merged = torch.zeros(patches.shape[0], n, n)
    for a in range(n):
        for b in range(n):
            merged[:, a, b] = patches[:, 4 * a : 4 * a + 4, 4 * b : 4 * b + 4].sum((1, 2)) / 4
    return patches, merged


@pytest.mark.parametrize("version", VERSIONS)
def test_encoder_attention_equals_eager_model(version):
    """Every block (Qwen2-VL: frame attention; Qwen2.5-VL: block 0 windowed, block 1 full)."""
    model = model_for(version)
    eager = model_for(version, "eager")
    inputs = qwen_batch(PROBE_TEXTS, PROBE_GRIDS, seed=5)
    full = eager_attention(eager, inputs)
    assert sorted(full) == [0, 1]
    probe = Probe()
    probe.seen = []
    with vlmprune.wrap(model, probe, budget=1.0):
        forward(model, inputs)
    assert sorted(len(s[0]) for s in probe.seen) == [1, 2]
    tower = QwenTower(model.model.visual)
    if version == "2.5":
        assert tower.full_blocks == {1}  # block 0 attends within windows
    for images, token_index, per_layer, mean_last in probe.seen:
        for layer, sig in per_layer.items():
            assert sig.shape == (len(images), 4, token_index.shape[1], token_index.shape[1])
            for j, i in enumerate(images):
                patches, merged = by_hand(version, model, inputs, full[layer], i)
                torch.testing.assert_close(sig[j], merged, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(sig[j].sum(-1), torch.ones_like(sig[j, :, :, 0]), atol=1e-5, rtol=0)
                # HiPrune's Qwen reduction (head mean, sum over queries, mean over a group's 4 patches)
                card = patches.mean(0).sum(0).view(-1, 4).mean(-1)
                torch.testing.assert_close(received_attention(sig[j : j + 1])[0] * sig.shape[-1], card, atol=1e-5, rtol=1e-5)
                if version == "2.5" and layer == 0:  # windows of 2x2 groups: no attention across them
                    assert int((merged.sum(0) > 0).sum(-1).max()) <= 4
        torch.testing.assert_close(mean_last, per_layer[1].mean(1))


def test_holov_and_hiprune_checks_and_layers_on_qwen():
    qwen = ModelInfo("qwen2_5_vl", None, None, False, 32, 31, 28, ("encoder", "projector", "llm"), ("encoder_attention", "projected"))
    assert vlmprune.get_method("hiprune")().layers(qwen) == (15, 31)  # README: 16 of 32, deep = last block
    tiny = ModelInfo("qwen2_vl", None, None, False, 2, 1, 4, ("projector",), ("encoder_attention",))
    assert vlmprune.get_method("hiprune")().layers(tiny) == (0, 1)
    vlmprune.get_method("holov")().check(qwen)
    with pytest.raises(ValueError, match="saliency='cls' needs a CLS token"):
        vlmprune.get_method("holov")(saliency="cls").check(qwen)
    model = model_for("2")
    with pytest.raises(ValueError, match="saliency='cls' needs a CLS token"):
        vlmprune.wrap(model, "holov", budget=8, saliency="cls")
    with pytest.raises(ValueError, match="needs a CLS token"):  # cls_attention stays unavailable
        vlmprune.wrap(model, "visionzip", budget=8)


# -- encoder q/k/v, the merger as a projector, pixels ---------------------------------------------
@dataclass
class SignalProbe(Method):
    """Test method: before vision block 1 keeps every other token (``prune``), before the merger
    (layer = depth) and at the projector keeps all; records ``encoder_qkv`` at every point and the
    projector-stage signals."""

    name = "test_qwen_signal_probe"
    stages = ("encoder", "projector")
    needs = frozenset({"encoder_qkv", "projector", "projector_input", "pixels"})
    positions = "original"
    prune: bool = False

    def points(self, info):
        return [Point("encoder", 1), Point("encoder", info.encoder_layers), Point("projector")]

    def capture_layers(self, info):
        return {"encoder": tuple(range(info.encoder_layers)), "llm": ()}

    def select(self, ctx):
        b, n = ctx.tokens.shape[:2]
        rec = {"images": list(ctx.images), "raster": ctx.token_index.clone()}
        layers = range(ctx.layer) if ctx.stage == "encoder" else range(ctx.info.encoder_layers)
        rec["qkv"] = {layer: ctx.signals.encoder_qkv(layer=layer) for layer in layers}
        if ctx.stage == "projector":
            rec["tokens"] = ctx.tokens
            rec["merged_by_projector"] = ctx.signals.projector()(ctx.signals.projector_input().flatten(0, 1)).view(b, n, -1)
            rec["pixels"] = ctx.signals.pixels()
        self.seen.setdefault(str(ctx.point), []).append(rec)
        keep = torch.arange(0, n, 2) if self.prune and ctx.layer == 1 else torch.arange(n)
        return Selection(keep=keep.expand(b, -1).clone())


def packed_rows(version, model, inputs, image):
    """Packed rows (the tower's order) of one image's patches, merge groups in raster order."""
    thw = inputs["image_grid_thw"]
    counts = [int(t * h * w) // 4 for t, h, w in thw.tolist()]
    order = QwenTower(model.model.visual).window_index(thw)[0] if version == "2.5" else torch.arange(sum(counts))
    groups = torch.argsort(order)[sum(counts[:image]) : sum(counts[: image + 1])]
    return (groups[:, None] * 4 + torch.arange(4)).flatten()


@pytest.mark.parametrize("version", VERSIONS)
def test_encoder_qkv_reproduces_each_block(version):
    """Per patch, q/k give the eager model's own attention (full-attention blocks) and the
    eager probabilities times v, through the block's output projection, give its output."""
    model, eager = model_for(version), model_for(version, "eager")
    inputs = qwen_batch(PROBE_TEXTS, PROBE_GRIDS, seed=5)
    visual = eager.model.visual
    outputs = {}
    hooks = [blk.attn.register_forward_hook(lambda m, a, out, i=i: outputs.setdefault(i, out.detach())) for i, blk in enumerate(visual.blocks)]
    try:
        full = eager_attention(eager, inputs)
    finally:
        for h in hooks:
            h.remove()
    probe = SignalProbe()
    probe.seen = {}
    with vlmprune.wrap(model, probe, budget=1.0):
        forward(model, inputs)
    tower = QwenTower(visual)
    for rec in probe.seen["projector"]:
        for layer, (q, k, v) in rec["qkv"].items():
            assert q.shape == (len(rec["images"]), 4, 4 * rec["raster"].shape[1], 8)
            for j, i in enumerate(rec["images"]):
                rows = packed_rows(version, model, inputs, i)
                eager_probs = full[layer][:, rows][:, :, rows]
                if layer in tower.full_blocks:
                    torch.testing.assert_close((q[j] @ k[j].transpose(1, 2) / 8**0.5).softmax(-1), eager_probs, atol=1e-5, rtol=1e-4)
                out = visual.blocks[layer].attn.proj((eager_probs @ v[j]).transpose(0, 1).flatten(1))
                torch.testing.assert_close(out, outputs[layer][rows], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("version", VERSIONS)
def test_encoder_qkv_follows_pruning_and_the_merger_is_the_projector(version):
    """After pruning before block 1, later points see the kept tokens' rows of the same q/k/v;
    ``projector(projector_input)`` gives the merged tokens, with and without that pruning."""
    model = model_for(version)
    inputs = qwen_batch(PROBE_TEXTS, PROBE_GRIDS, seed=6)
    for prune in (False, True):
        probe = SignalProbe(prune=prune)
        probe.seen = {}
        with vlmprune.wrap(model, probe, budget=1.0) as handle:
            forward(model, inputs)
        first = {tuple(r["images"]): r for r in probe.seen["encoder:1"]}
        for point in ("encoder:2", "projector"):
            for rec in probe.seen[point]:
                before = first[tuple(rec["images"])]
                kept = torch.arange(0, before["raster"].shape[1], 2) if prune else torch.arange(before["raster"].shape[1])
                assert torch.equal(rec["raster"], before["raster"][:, kept])
                rows = (kept[:, None] * 4 + torch.arange(4)).flatten()
                for a, b in zip(rec["qkv"][0], before["qkv"][0]):
                    torch.testing.assert_close(a, b[:, :, rows], atol=0, rtol=0)
        assert probe.seen["encoder:2"][0]["qkv"][1][0].shape[2] == 4 * probe.seen["encoder:2"][0]["raster"].shape[1]
        for rec in probe.seen["projector"]:
            torch.testing.assert_close(rec["merged_by_projector"], rec["tokens"], atol=1e-5, rtol=1e-5)
        counts = [g * h // 4 for g, h in PROBE_GRIDS]
        assert handle.stats["llm_visual_tokens"] == ([(c + 1) // 2 for c in counts] if prune else counts)


def test_pixels_are_each_tokens_image_region():
    """Through the real Qwen2-VL image processor (no resize / rescale / normalise): the
    ``pixels`` of merged token (r, c) are the image's ``8 x 8`` block at (r, c)."""
    from transformers import Qwen2VLImageProcessor

    proc = Qwen2VLImageProcessor(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=64 * 64 * 4,
        do_resize=False, do_rescale=False, do_normalize=False,
    )
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(64, 48, 3, generator=gen), torch.rand(32, 64, 3, generator=gen)]
    pix = proc(images=[im.numpy() for im in images], return_tensors="pt")
    grids = [(int(h), int(w)) for _, h, w in pix["image_grid_thw"].tolist()]
    assert grids == [(16, 12), (8, 16)]
    inputs = qwen_batch([[10], [11, 12]], grids)
    inputs["pixel_values"] = pix["pixel_values"]
    model = model_for("2")
    probe = SignalProbe()
    probe.seen = {}
    with vlmprune.wrap(model, probe, budget=1.0):
        forward(model, inputs)
    for rec in probe.seen["projector"]:
        for j, i in enumerate(rec["images"]):
            image = images[i].permute(2, 0, 1)
            cols = grids[i][1] // 2
            for t, r in enumerate(rec["raster"][j].tolist()):
                row, col = divmod(r, cols)
                torch.testing.assert_close(rec["pixels"][j, t], image[:, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8])
