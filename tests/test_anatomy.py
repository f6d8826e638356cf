"""The anatomy table of ViT-like towers (adapters/vision.py, issue 13 move 7): timm (fused qkv,
registers, LayerScale, q/k norms), open_clip (nn.MultiheadAttention, batch first or not) and HF
towers read through one table; captured q/k/v equal the blocks' own weights applied by hand; prefix
counts; encoder signals with registers; unknown towers refused."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

from adapters.base import Installed
from adapters.vision import (
    ANATOMY,
    EncoderCapture,
    VisionTower,
    encoder_signals,
    install_capture,
)

WIDTH, HEADS, DEPTH, SIDE, PATCH = 32, 4, 2, 32, 8
N = (SIDE // PATCH) ** 2  # 16 patches


def timm_vit(**kwargs) -> nn.Module:
    vt = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    model = vt.VisionTransformer(
        img_size=SIDE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=0, **kwargs
    ).eval()
    with torch.no_grad():  # LayerScale (init_values) and the q/k norms away from their identity init
        for name, p in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma", "q_norm.weight", "k_norm.weight", "reg_token", "cls_token")):
                p.normal_()
    return model


def open_clip_vit() -> nn.Module:
    transformer = pytest.importorskip("open_clip.transformer")
    torch.manual_seed(0)
    return transformer.VisionTransformer(
        image_size=SIDE, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS, mlp_ratio=2.0, output_dim=16,
        ls_init_value=0.5,
    ).eval()


def hf(model_cls, config_cls, **extra) -> nn.Module:
    torch.manual_seed(0)
    common = {"hidden_size": WIDTH, "num_hidden_layers": DEPTH, "num_attention_heads": HEADS,
              "intermediate_size": 64, "patch_size": PATCH}
    if config_cls is not T.Siglip2VisionConfig:
        common["image_size"] = SIDE
    return model_cls(config_cls(**common, **extra)).eval()


def run_capturing(tower: VisionTower, pixels: torch.Tensor, layers=tuple(range(DEPTH))):
    """Capture q/k/v at ``layers`` while the tower runs; also record each block's input (the
    reference for the manual computation). Returns (store, inputs, output)."""
    store, inputs, installed = EncoderCapture(), {}, Installed()
    install_capture(installed, tower, layers, lambda: store, lambda: torch.arange(N).expand(pixels.shape[0], -1))
    hooks = [
        block.register_forward_pre_hook(lambda m, args, kwargs, i=i: inputs.__setitem__(i, args[0] if args else
                                        next(iter(kwargs.values()))), with_kwargs=True)
        for i, block in enumerate(tower.layers)
    ]
    with torch.no_grad():
        out = tower.tower(pixels)
    for h in hooks:
        h.remove()
    installed.remove()
    return store, inputs, out


def heads(x: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, HEADS, WIDTH // HEADS).transpose(1, 2)


def assert_qkv(store: EncoderCapture, layer: int, q, k, v):
    for key, want in zip("qkv", (q, k, v)):
        torch.testing.assert_close(store.qkv[layer][key], want, rtol=1e-5, atol=1e-6)


PIXELS = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))


def test_timm_fused_qkv_with_registers_layerscale_and_qk_norm():
    model = timm_vit(class_token=True, reg_tokens=2, init_values=1e-5, qk_norm=True)
    tower = VisionTower(model)
    assert (tower.flavour, tower.prefix, tower.has_cls, tower.depth, tower.heads, tower.head_dim) == ("timm", 3, True, 2, 4, 8)
    assert tower.final_norm is model.norm
    reference = model(PIXELS)
    store, inputs, out = run_capturing(tower, PIXELS)
    assert torch.equal(out, reference)  # hooks only: LayerScale and the rest run as timm wrote them
    for layer, block in enumerate(model.blocks):
        y = block.norm1(inputs[layer])
        q, k, v = F.linear(y, block.attn.qkv.weight, block.attn.qkv.bias).split(WIDTH, dim=-1)
        qn, kn = block.attn.q_norm, block.attn.k_norm
        q = F.layer_norm(heads(q), (WIDTH // HEADS,), qn.weight, qn.bias, qn.eps)
        k = F.layer_norm(heads(k), (WIDTH // HEADS,), kn.weight, kn.bias, kn.eps)
        assert store.qkv[layer]["q"].shape == (2, HEADS, 3 + N, WIDTH // HEADS)
        assert_qkv(store, layer, q, k, heads(v))


def test_timm_without_class_token_counts_registers_as_prefix_but_no_cls():
    tower = VisionTower(timm_vit(class_token=False, reg_tokens=4, global_pool="avg"))
    assert (tower.prefix, tower.has_cls) == (4, False)


@pytest.mark.parametrize("batch_first", [True, False])
def test_open_clip_multihead_attention_in_proj(batch_first):
    model = open_clip_vit()
    reference = model(PIXELS)
    if not batch_first:  # the sequence-first layout of open_clip releases before batch_first
        model.transformer.batch_first = False
        for block in model.transformer.resblocks:
            block.attn.batch_first = False
    tower = VisionTower(model)
    assert (tower.flavour, tower.prefix, tower.has_cls, tower.heads, tower.head_dim, tower.final_norm) == (
        "open_clip", 1, True, 4, 8, None)
    store, inputs, out = run_capturing(tower, PIXELS)
    torch.testing.assert_close(out, reference)
    for layer, block in enumerate(model.transformer.resblocks):
        x = inputs[layer] if batch_first else inputs[layer].transpose(0, 1)
        y = block.ln_1(x)
        w, b = block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)
        assert_qkv(store, layer, *(heads(F.linear(y, w[i], b[i])) for i in range(3)))


def test_open_clip_custom_attention_blocks_are_refused():
    transformer = pytest.importorskip("open_clip.transformer")
    model = transformer.VisionTransformer(image_size=SIDE, patch_size=PATCH, width=WIDTH, layers=1, heads=HEADS,
                                          mlp_ratio=2.0, qk_norm=True)
    with pytest.raises(ValueError, match="only nn.MultiheadAttention with one in_proj_weight is supported"):
        VisionTower(model)


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_hf_separate_projections(kind):
    if kind == "clip":
        model = hf(T.CLIPVisionModel, T.CLIPVisionConfig)
        blocks = model.encoder.layers
        parts = lambda blk: (blk.layer_norm1, blk.self_attn)
    else:
        model = hf(T.ViTModel, T.ViTConfig)
        blocks = model.layers
        parts = lambda blk: (blk.layernorm_before, blk.attention)
    tower = VisionTower(model)
    assert (tower.flavour, tower.prefix, tower.has_cls, tower.depth) == (kind, 1, True, DEPTH)
    store, inputs, _ = run_capturing(tower, PIXELS)
    for layer, block in enumerate(blocks):
        norm, attn = parts(block)
        y = norm(inputs[layer])
        assert_qkv(store, layer, *(heads(F.linear(y, p.weight, p.bias)) for p in (attn.q_proj, attn.k_proj, attn.v_proj)))


@pytest.mark.parametrize(
    "build, flavour, prefix, has_cls",
    [
        (lambda: hf(T.CLIPVisionModel, T.CLIPVisionConfig), "clip", 1, True),
        (lambda: hf(T.SiglipVisionModel, T.SiglipVisionConfig), "siglip", 0, False),
        (lambda: hf(T.Siglip2VisionModel, T.Siglip2VisionConfig), "siglip", 0, False),
        (lambda: hf(T.Dinov2Model, T.Dinov2Config), "dinov2", 1, True),
        (lambda: hf(T.Dinov2WithRegistersModel, T.Dinov2WithRegistersConfig, num_register_tokens=3),
         "dinov2_with_registers", 4, True),
        (lambda: hf(T.ViTModel, T.ViTConfig), "vit", 1, True),
        (lambda: hf(T.DeiTModel, T.DeiTConfig), "deit", 2, True),
    ],
)
def test_hf_prefix_counts(build, flavour, prefix, has_cls):
    model = build()
    tower = VisionTower(model)
    assert (tower.flavour, tower.prefix, tower.has_cls, tower.depth, tower.heads) == (flavour, prefix, has_cls, DEPTH, HEADS)
    if isinstance(model, T.Siglip2VisionModel):
        return  # takes packed patches, not an image tensor; the count above is what the table says
    store, _, out = run_capturing(tower, PIXELS, layers=(0,))
    assert store.qkv[0]["q"].shape[2] == prefix + N == out.last_hidden_state.shape[1]


def test_encoder_signals_with_registers_offset_by_the_whole_prefix():
    """timm with a CLS token and 2 registers: the signals put CLS first, skip the registers (which
    still take part in the softmax) and align the patches with ``token_index``."""
    model = timm_vit(class_token=True, reg_tokens=2, init_values=1e-5)
    tower = VisionTower(model)
    store, _, _ = run_capturing(tower, PIXELS, layers=(1,))
    current = torch.tensor([[1, 4, 5, 15], [0, 2, 9, 10]])  # raster indices of the tokens alive now
    signals = encoder_signals(tower, store, current, default_layer=1)
    q, k = store.qkv[1]["q"], store.qkv[1]["k"]
    rows = torch.cat([torch.zeros(2, 1, dtype=torch.long), current + 3], dim=1)  # CLS, then patches after 3 prefix
    probs = torch.softmax(q @ k.transpose(-1, -2) * (WIDTH // HEADS) ** -0.5, dim=-1)  # over all 3 + 16 keys
    cls = torch.stack([probs[i, :, 0, current[i] + 3] for i in range(2)])
    torch.testing.assert_close(signals["cls_attention"](reduce="none"), cls)
    torch.testing.assert_close(signals["cls_attention"](reduce="sum"), cls.sum(1))
    want_q = torch.stack([q[i, :, rows[i]] for i in range(2)])
    torch.testing.assert_close(signals["encoder_qkv"]()[0], want_q)
    want_attn = torch.stack([probs[i][:, rows[i]][:, :, rows[i]] for i in range(2)])
    torch.testing.assert_close(signals["encoder_attention"](), want_attn)


def test_unknown_towers_are_refused_naming_the_supported_flavours():
    with pytest.raises(ValueError, match=r"unknown vision tower Linear \(model_type=None\); supported tower flavours: "
                                         r"clip \(clip_vision_model\).*timm .*open_clip "):
        VisionTower(nn.Linear(2, 2))
    odd = nn.Module()
    odd.config = types.SimpleNamespace(model_type="pixtral")
    with pytest.raises(ValueError, match=r"model_type='pixtral'") as refused:
        VisionTower(odd)
    assert all(f"{row.flavour} (" in str(refused.value) for row in ANATOMY)
