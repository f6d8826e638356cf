"""The ViT adapter on timm, open_clip and transformers CLIP / SigLIP / DINOv2 towers
(adapters/vit.py ``FLAVOURS``, issue 14 item 1): matched by class, the boundary methods (DivPrune,
uniform, random, VisionZip where a CLS token exists) run unchanged; keep-all bit-identical, exact
counts, batch = singles, unwrap leaves no hook; registers never pruned; average pooling reads the
kept patches only; open_clip run sequence first. Tiny models, CPU. The oracles of the
conformance kit run on the timm and open_clip cases of tests/cases.py."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import transformers as T

import vlmprune
from adapters.base import adapter_class
from adapters.vit import ViTAdapter
from tests.cases import OpenClipCase, TimmCase
from tests.truth import hook_count

pytest.importorskip("timm")
pytest.importorskip("open_clip")

SIDE, PATCH, DEPTH = 32, 8, 3
N = (SIDE // PATCH) ** 2
METHODS = ("divprune", "uniform", "random", "visionzip")
PIXELS = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
TIMM, TIMM_AVG, OPEN_CLIP = TimmCase("token"), TimmCase("avg"), OpenClipCase()


@functools.cache
def hf(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = {"hidden_size": 32, "num_hidden_layers": DEPTH, "num_attention_heads": 4, "intermediate_size": 64,
              "patch_size": PATCH, "image_size": SIDE}
    model_cls, config_cls = {"clip": (T.CLIPVisionModel, T.CLIPVisionConfig), "siglip": (T.SiglipVisionModel, T.SiglipVisionConfig),
                             "dinov2": (T.Dinov2Model, T.Dinov2Config)}[name]
    return model_cls(config_cls(**common)).eval()


def hf_forward(model, pixels):
    """The pooled output and the final sequence (flattened) of one forward."""
    with torch.no_grad():
        out = model(pixel_values=pixels)
    return torch.cat([out.pooler_output, out.last_hidden_state.flatten(1)], dim=1)


#: name -> (model, forward(model, pixels), prefix tokens, has a CLS token)
TOWERS = {
    "timm-token": (TIMM.model, lambda m, x: TIMM.forward(m, {"pixel_values": x}), 3, True),
    "timm-avg": (TIMM_AVG.model, lambda m, x: TIMM_AVG.forward(m, {"pixel_values": x}), 2, False),
    "open-clip": (OPEN_CLIP.model, lambda m, x: OPEN_CLIP.forward(m, {"pixel_values": x}), 1, True),
    "clip": (lambda: hf("clip"), hf_forward, 1, True),
    "siglip": (lambda: hf("siglip"), hf_forward, 0, False),
    "dinov2": (lambda: hf("dinov2"), hf_forward, 1, True),
}
#: width of the head output before the flattened sequence in each forward
HEAD = {"timm-token": 5, "timm-avg": 5, "open-clip": 16, "clip": 32, "siglip": 32, "dinov2": 32}


def test_flavours_are_matched_by_class_with_their_tower_facts():
    for name, (build, _, prefix, has_cls) in TOWERS.items():
        model = build()
        info = ViTAdapter(model).info()
        assert adapter_class(model) is ViTAdapter
        assert (info.family, info.grid, info.n_tokens, info.stages["vit"].prefix, info.has_cls) == ("vit", (4, 4), N, prefix, has_cls), name
        assert info.default_points == {"boundary": vlmprune.Point("vit", DEPTH)}
    # heads that read every patch back are not served
    masked = T.ViTForMaskedImageModeling(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                     intermediate_size=64, image_size=SIDE, patch_size=PATCH))
    assert adapter_class(masked) is None


@pytest.mark.parametrize("name", list(TOWERS))
@pytest.mark.parametrize("method", METHODS)
def test_boundary_methods_run_on_every_flavour(name, method):
    """Keep-all bit-identical (VisionZip merges, so counts only); 6 patches kept per image after
    the prefix at vit:1 and vit:3; a batch equals its images one by one (not random, which draws
    once per forward); unwrap leaves no hook and the outputs of before. VisionZip on a tower
    without a CLS token is refused at wrap() with nothing installed."""
    build, forward, prefix, has_cls = TOWERS[name]
    model = build()
    reference = forward(model, PIXELS)
    before = hook_count(model)
    if method == "visionzip" and not has_cls:
        with pytest.raises(ValueError, match="method 'visionzip' needs a CLS token"):
            vlmprune.wrap(model, method, budget=6)
        assert hook_count(model) == before
        return
    width = 32
    for layer in (1, DEPTH):
        with vlmprune.wrap(model, method, budget=N, boundary_layer=layer):
            full = forward(model, PIXELS)
        if method != "visionzip":
            assert torch.equal(full, reference)
        with vlmprune.wrap(model, method, budget=6, boundary_layer=layer) as handle:
            pruned = forward(model, PIXELS)
            assert [p["out"] for p in handle.stats["points"]] == [[6, 6]] and handle.stats["points"][0]["in"] == [N, N]
            # VisionZip's budget counts the CLS token it keeps (its prefix)
            tokens = (prefix - 1 + 6) if method == "visionzip" else prefix + 6
            seq = (tokens - (1 if name == "open-clip" else 0)) * width  # open_clip returns the patches only
            assert pruned.shape == (2, HEAD[name] + seq)
            if method != "random":
                singles = torch.cat([forward(model, PIXELS[i : i + 1]) for i in range(2)])
                torch.testing.assert_close(pruned, singles, rtol=1e-5, atol=1e-5)
    assert hook_count(model) == before and torch.equal(forward(model, PIXELS), reference)


def test_registers_are_never_pruned_and_the_method_sees_the_patches_only():
    """timm with CLS and two registers: the method gets the 16 patches (raster indices 0..15), the
    3 prefix tokens pass through; the final sequence equals the blocks run by hand on the prefix
    and the kept patches."""
    model = TIMM.model()
    with vlmprune.wrap(model, "uniform", budget=4, boundary_layer=1) as handle, handle.record() as records:
        pruned = TIMM.forward(model, {"pixel_values": PIXELS})
    (record,) = records
    assert record.selection.keep.tolist() == [[5, 7, 13, 15]] * 2
    assert torch.equal(record.token_index, torch.arange(N).expand(2, -1))
    with torch.no_grad():
        h = TIMM.embed(model, PIXELS)
        h = model.blocks[0](h)
        h = torch.cat([h[:, :3], h[:, 3:][:, [5, 7, 13, 15]]], dim=1)
        h = model.norm(model.blocks[1:](h))
    assert pruned.shape == (2, 5 + 7 * 32)
    torch.testing.assert_close(pruned[:, 5:].view(2, 7, 32), h, rtol=1e-5, atol=1e-6)


def test_average_pooling_reads_the_mean_of_the_kept_patches():
    """timm ``global_pool="avg"`` (registers, no CLS): pruning after the last block changes the
    logits, which equal the head on the mean of the kept patches (registers excluded) through
    ``fc_norm``; open_clip ``pool_type="avg"`` likewise through ``ln_post`` and ``proj``."""
    model = TIMM_AVG.model()
    with torch.no_grad():
        reference = model(PIXELS)
    with vlmprune.wrap(model, "divprune", budget=5) as handle, handle.record() as records, torch.no_grad():
        logits = model(PIXELS)
    keep = records[0].selection.keep
    with torch.no_grad():
        h = model.norm(model.blocks(TIMM_AVG.embed(model, PIXELS)))
        kept = h[:, 2:].gather(1, keep.unsqueeze(-1).expand(-1, -1, 32))
        want = model.head(model.fc_norm(kept.mean(1)))
    assert not torch.allclose(logits, reference, atol=1e-4)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)

    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    clip = VisionTransformer(image_size=SIDE, patch_size=PATCH, width=32, layers=DEPTH, heads=4, mlp_ratio=2.0,
                             output_dim=16, pool_type="avg").eval()
    with torch.no_grad():
        reference = clip(PIXELS)
    with vlmprune.wrap(clip, "divprune", budget=5) as handle, handle.record() as records, torch.no_grad():
        pooled = clip(PIXELS)
    keep = records[0].selection.keep
    with torch.no_grad():
        h = clip.transformer(clip._embeds(PIXELS))
        kept = clip.ln_post(h)[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, 32))
        want = kept.mean(1) @ clip.proj
    assert not torch.allclose(pooled, reference, atol=1e-4)
    torch.testing.assert_close(pooled, want, rtol=1e-5, atol=1e-6)


def test_open_clip_sequence_first_prunes_like_batch_first():
    """An open_clip tower whose transformer runs sequence first (``batch_first=False``, as older
    open_clip releases did) gives the outputs of the batch-first one, unpruned and pruned."""
    model = OPEN_CLIP.model()
    seq_first = copy.deepcopy(model)
    seq_first.transformer.batch_first = False
    for block in seq_first.transformer.resblocks:
        block.attn.batch_first = False
    ref = OPEN_CLIP.forward(model, {"pixel_values": PIXELS})
    torch.testing.assert_close(OPEN_CLIP.forward(seq_first, {"pixel_values": PIXELS}), ref, rtol=1e-5, atol=1e-6)
    for layer in (1, DEPTH):
        with vlmprune.wrap(model, "visionzip", budget=6, boundary_layer=layer):
            want = OPEN_CLIP.forward(model, {"pixel_values": PIXELS})
        with vlmprune.wrap(seq_first, "visionzip", budget=6, boundary_layer=layer):
            got = OPEN_CLIP.forward(seq_first, {"pixel_values": PIXELS})
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
