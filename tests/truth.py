"""Shared machinery for the truth tests of DESIGN.md: reference computations done by hand
with the *unwrapped* model's own modules, and a selection recorder."""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers.masking_utils import create_causal_mask

from tests.tiny import IMAGE_TOKEN


@contextlib.contextmanager
def record_selections(handle):
    """Record every Selection the wrapped method returns (a recording subclass, as kvpress does)."""
    method = handle.method
    seen = []
    original = method.select

    def select(ctx):
        sel = original(ctx)
        seen.append((ctx.point, ctx.token_index.clone(), sel))
        return sel

    object.__setattr__(method, "select", select)
    try:
        yield seen
    finally:
        object.__delattr__(method, "select")


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def full_embeddings(model, inputs):
    """LM input embeddings with every image feature scattered in (the unwrapped path)."""
    core = model.model
    emb = core.get_input_embeddings()(inputs["input_ids"])
    feats = core.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    feats = torch.cat(list(feats)).to(emb.dtype)
    mask = (inputs["input_ids"] == IMAGE_TOKEN).unsqueeze(-1)
    return emb.masked_scatter(mask, feats)


def vision_features(model, pixel_values):
    """(patch features [B, N, C], CLS [B, C] or None) of the feature layer, unwrapped."""
    core = model.model
    out = core.vision_tower(pixel_values, output_hidden_states=True)
    hidden = out.hidden_states[model.config.vision_feature_layer]
    has_cls = model.config.vision_config.model_type != "siglip_vision_model"
    return (hidden[:, 1:], hidden[:, 0]) if has_cls else (hidden, None)


def pruned_prompt(model, inputs, image_tokens: list[torch.Tensor]):
    """Rebuild each prompt by hand with its image span replaced by ``image_tokens[i]``
    (LLM-space vectors), left-pad the rows, and return embeds, mask, compact positions."""
    core = model.model
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    emb = core.get_input_embeddings()(ids)
    rows = []
    for i in range(ids.shape[0]):
        real = mask[i].bool()
        row_ids, row_emb = ids[i][real], emb[i][real]
        img = (row_ids == IMAGE_TOKEN).nonzero().flatten()
        start, end = int(img[0]), int(img[-1]) + 1
        rows.append(torch.cat([row_emb[:start], image_tokens[i].to(emb.dtype), row_emb[end:]]))
    longest = max(r.shape[0] for r in rows)
    out = emb.new_zeros(len(rows), longest, emb.shape[-1])
    new_mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, longest - r.shape[0] :] = r
        new_mask[i, longest - r.shape[0] :] = 1
    return out, new_mask, positions_from_mask(new_mask)


def manual_llm_prune(model, inputs, k_layer: int, keep_positions: torch.Tensor):
    """Run the unwrapped LLM layer by layer, keeping only ``keep_positions`` ([B, L'] sequence
    positions, equal count per row) from decoder layer ``k_layer`` on, with original
    position ids. Returns logits ``[B, L', V]``."""
    lm = model.model.language_model
    embeds = full_embeddings(model, inputs)
    mask2d = inputs["attention_mask"]
    pos = positions_from_mask(mask2d)
    params = inspect.signature(create_causal_mask).parameters  # spelled differently in 5.17 and 5.24
    kwargs = {"config": lm.config, "attention_mask": mask2d, "position_ids": pos}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = embeds
    kwargs["cache" if "cache" in params else "past_key_values"] = None
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(embeds.shape[1])
    mask = create_causal_mask(**kwargs)
    cos, sin = lm.rotary_emb(embeds, position_ids=pos)
    hidden = embeds
    for i, layer in enumerate(lm.layers):
        if i == k_layer:
            idx = keep_positions
            hidden = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
            cos = cos.expand(idx.shape[0], -1, -1).gather(1, idx[..., None].expand(-1, -1, cos.shape[-1]))
            sin = sin.expand(idx.shape[0], -1, -1).gather(1, idx[..., None].expand(-1, -1, sin.shape[-1]))
            pos = pos.gather(1, idx)
            if mask is not None:
                mask = mask.expand(idx.shape[0], -1, -1, -1)
                mask = mask.gather(2, idx[:, None, :, None].expand(-1, 1, -1, mask.shape[-1]))
                mask = mask.gather(3, idx[:, None, None, :].expand(-1, 1, mask.shape[2], -1))
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos)
    return model.lm_head(lm.norm(hidden))


def greedy_no_cache(model, inputs, steps: int) -> torch.Tensor:
    """Greedy decoding that re-runs the whole prompt at every step (no KV cache)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    new = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=inputs["pixel_values"],
                position_ids=positions_from_mask(mask),
                use_cache=False,
            ).logits
        last = logits[:, -1]
        last[:, IMAGE_TOKEN] = float("-inf")  # as generate(suppress_tokens=[IMAGE_TOKEN])
        nxt = last.argmax(-1, keepdim=True)
        new.append(nxt)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return torch.cat(new, 1)
