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


# -- Qwen2-VL / Qwen2.5-VL -----------------------------------------------------------------------
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 3, 4, 5, 6
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2


def tiny_qwen(version: str = "2", attn: str = "sdpa", seed: int = 0):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    text = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
    )
    common = dict(patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL, in_channels=3)
    ids = dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END)
    if version == "2":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, **common)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text, **ids))
    elif version == "2.5":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, window_size=16, fullatt_block_indexes=[1], **common)
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids))
    else:
        raise ValueError(version)
    model.set_attn_implementation(attn)
    return model.eval()


def qwen_batch(texts: list[list[int]], grids: list[tuple[int, int]], seed: int = 0):
    """One image per prompt, ``grids[i]`` = (h, w) in patches (multiples of 2); left padding."""
    gen = torch.Generator().manual_seed(seed)
    rows, pixels, thw = [], [], []
    for text, (h, w) in zip(texts, grids):
        n = h * w // QWEN_MERGE**2
        rows.append([1, QWEN_START] + [QWEN_IMAGE] * n + [QWEN_END] + text)
        pixels.append(torch.randn(h * w, 3 * QWEN_TEMPORAL * QWEN_PATCH**2, generator=gen))
        thw.append([1, h, w])
    longest = max(map(len, rows))
    ids = torch.tensor([[PAD] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.cat(pixels),
        "image_grid_thw": torch.tensor(thw),
        "mm_token_type_ids": (ids == QWEN_IMAGE).int(),
    }


def qwen_prompt_with_images(grids: list[tuple[int, int]], texts: list[int], seeds: list[int]):
    """One prompt holding several images: ``<s> [image 1] text 1 [image 2] text 2 ...`` (no
    padding); image ``i`` is :func:`qwen_batch`'s with ``grids[i]`` and ``seeds[i]``."""
    parts = [qwen_batch([[t]], [g], seed=s) for g, t, s in zip(grids, texts, seeds)]
    ids = torch.cat([parts[0]["input_ids"]] + [p["input_ids"][:, 1:] for p in parts[1:]], 1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.cat([p["pixel_values"] for p in parts]),
        "image_grid_thw": torch.cat([p["image_grid_thw"] for p in parts]),
        "mm_token_type_ids": (ids == QWEN_IMAGE).int(),
    }
