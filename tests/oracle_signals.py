"""Reference signals for the oracle tests, computed from a tiny LLaVA's own modules and its eager
``output_attentions`` (never through vlmprune's signal code), and checks that a score matches the
reference at the layer a method card names and no other."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .tiny import IMAGE_TOKEN, batch, tiny_llava

TEXT = [10, 11, 12, 13, 14]  # five text tokens after the image: the "instruction" rows


def sharpen(model, factor: float = 16.0) -> None:
    """Scale every query projection so attention rows are peaked (random weights give nearly
    uniform rows, whose layers differ by little)."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.q_proj.bias.mul_(factor)


def reference(seed: int = 3) -> SimpleNamespace:
    """An eager tiny LLaVA (CLIP tower, 4 + 4 layers, 4 query / 2 KV heads), one prompt
    ``BOS [256 image tokens] TEXT``, and its unpruned references: LLM and vision attentions and
    hidden states, the vision features that reach the projector and their projections."""
    model = tiny_llava("clip", "eager")
    sharpen(model)
    inputs = batch([TEXT], seed=seed)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
        vis = model.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        feats = vis.hidden_states[-2][:, 1:]  # vision_feature_layer=-2, CLS dropped ("default")
        projected = model.model.multi_modal_projector(feats)
    img = (inputs["input_ids"][0] == IMAGE_TOKEN).nonzero().flatten()
    return SimpleNamespace(
        model=model, inputs=inputs, llm_attn=out.attentions, llm_hidden=out.hidden_states,
        vis_attn=vis.attentions, vis_hidden=vis.hidden_states, feats=feats, projected=projected, img=img,
        text=torch.arange(int(img[-1]) + 1, inputs["input_ids"].shape[1]),
    )


def last_row(attn: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Head-mean attention the last prompt token pays the image tokens, ``[1, N]``."""
    return attn[:, :, -1, img].mean(1)


def vision_v(ref, layer: int) -> torch.Tensor:
    """Values of CLIP layer ``layer`` (its own layer norm and ``v_proj`` on its input), ``[1, H, T, D]``."""
    block = ref.model.model.vision_tower.encoder.layers[layer]
    x = block.layer_norm1(ref.vis_hidden[layer])
    heads = block.self_attn.num_heads
    v = block.self_attn.v_proj(x)
    return v.view(*v.shape[:2], heads, -1).transpose(1, 2)


def assert_only_at(scores: torch.Tensor, refs: dict, at, atol: float = 1e-6) -> None:
    """``scores`` equal ``refs[at]`` and differ from every other reference by far more than the
    tolerance, so that reading another layer (query, feature) fails."""
    torch.testing.assert_close(scores.float(), refs[at].float(), atol=atol, rtol=1e-4)
    for key, other in refs.items():
        if key != at:
            assert (scores.float() - other.float()).abs().max() > 100 * atol, f"reference {key!r} is too close to {at!r}"
