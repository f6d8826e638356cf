"""Tiny random-weight LLaVA models built from configs, and batched inputs with padding."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    Dinov2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)

IMAGE_TOKEN = 3
PAD = 0
VOCAB = 96
SIDE = 64  # pixels
PATCH = 4  # -> 16 x 16 = 256 patches


def vision_config(tower: str):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, patch_size=PATCH)
    if tower == "clip":
        return CLIPVisionConfig(image_size=SIDE, projection_dim=32, **common)
    if tower == "siglip":
        return SiglipVisionConfig(image_size=SIDE, **common)
    if tower == "dinov2":
        common["intermediate_size"] = 32 * 4
        return Dinov2Config(image_size=SIDE, layerscale_value=1.0, **{k: v for k, v in common.items() if k != "intermediate_size"}, mlp_ratio=4)
    raise ValueError(tower)


def tiny_llava(tower: str = "clip", attn: str = "sdpa", seed: int = 0, layers: int = 4) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision_config(tower),
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="full" if tower == "siglip" else "default",
    )
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


def n_patches() -> int:
    return (SIDE // PATCH) ** 2


def batch(texts: list[list[int]], seed: int = 0, pad_left: bool = True):
    """One image per prompt: ``[BOS] [image tokens] text``; left padding to the longest."""
    gen = torch.Generator().manual_seed(seed)
    n_img_tokens = n_patches()
    rows = [[1] + [IMAGE_TOKEN] * n_img_tokens + t for t in texts]
    longest = max(map(len, rows))
    ids, mask = [], []
    for r in rows:
        pad = [PAD] * (longest - len(r))
        ids.append(pad + r if pad_left else r + pad)
        mask.append(([0] * len(pad) + [1] * len(r)) if pad_left else ([1] * len(r) + [0] * len(pad)))
    pixel_values = torch.randn(len(texts), 3, SIDE, SIDE, generator=gen)
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "pixel_values": pixel_values,
    }
