"""The conformance kit's PI0 case (adapters/pi0.py): :class:`PI0Case`, a tiny transformers
``PI0ForConditionalGeneration`` (transformers >= 5.17), hooked into tests/cases.py ``CASES``."""

from __future__ import annotations

from typing import ClassVar

import torch

from tests.cases import AdapterCase

IMAGE, BOS, PAD = 3, 1, 0
SIDE, PATCH = 32, 4
N = (SIDE // PATCH) ** 2  # 64 tokens per camera image
CHUNK, STATE, ACTION, STEPS = 5, 6, 4, 3


def tiny_pi0(attn: str = "sdpa", seed: int = 0, layers: int = 4):
    """PaliGemma (SigLIP 32 px / 4 px patches, Gemma 4 layers, width 64) + a 4-layer Gemma action
    expert (width 32); the vision ``projection_dim`` is the text width (EMBEDDED.md)."""
    from transformers import PI0Config, PI0ForConditionalGeneration

    torch.manual_seed(seed)
    gemma = {"model_type": "gemma", "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
             "vocab_size": 96}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "patch_size": PATCH, "image_size": SIDE, "vision_use_head": False}
    vlm = {"model_type": "paligemma", "image_token_id": IMAGE, "pad_token_id": PAD, "projection_dim": 64,
           "text_config": {**gemma, "hidden_size": 64, "intermediate_size": 128}, "vision_config": vision}
    config = PI0Config(vlm_config=vlm, dit_config={**gemma, "hidden_size": 32, "intermediate_size": 64}, chunk_size=CHUNK,
                       max_state_dim=STATE, max_action_dim=ACTION, num_inference_steps=STEPS)
    config._attn_implementation = attn
    model = PI0ForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


def pi0_batch(texts: list[list[int]], seed: int = 0, cameras: list[int] | None = None) -> dict:
    """Left-padded prompts ``[image tokens per real camera] [BOS] text`` (PaliGemma's order), the
    cameras' pixels (``cameras[i]`` real of ``max(cameras)``, padding cameras last), a state and the
    initial noise, all drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    cameras = cameras or [1] * len(texts)
    rows = [[IMAGE] * (N * c) + [BOS] + t for t, c in zip(texts, cameras)]
    longest = max(map(len, rows))
    ids = torch.tensor([[PAD] * (longest - len(r)) + r for r in rows])
    cams = max(cameras)
    return {
        "input_ids": ids,
        "attention_mask": (torch.arange(longest)[None] >= torch.tensor([longest - len(r) for r in rows])[:, None]).long(),
        "pixel_values": torch.randn(len(rows), cams, 3, SIDE, SIDE, generator=gen),
        "pixel_attention_mask": torch.arange(cams)[None] < torch.tensor(cameras)[:, None],
        "state": torch.randn(len(rows), STATE, generator=gen),
        "noise": torch.randn(len(rows), CHUNK, ACTION, generator=gen),
    }


def row_of(inputs: dict, i: int) -> dict:
    """Row ``i`` of a :func:`pi0_batch`, its padding removed."""
    real = inputs["attention_mask"][i].bool()
    out = {k: v[i : i + 1] for k, v in inputs.items()}
    out["input_ids"], out["attention_mask"] = out["input_ids"][:, real], out["attention_mask"][:, real]
    return out


class PI0Case(AdapterCase):
    """:func:`tiny_pi0`, one camera per prompt; the oracles read ``sample_actions`` (the fixed
    initial noise, 3 denoising steps): the denoised action chunk ``[B, 5, 4]``, a row per action
    whatever is pruned. PI0 decodes no tokens (no ``generate``); its prefix is cached once per
    control step, and the cache oracle compares ``sample_actions`` with the same denoising loop
    through the training forward, which recomputes the prefix at every step. Family ``vla``: the
    methods the VLA benchmark compares run here."""

    id, family = "pi0", "vla"
    texts: ClassVar[list[list[int]]] = [[10, 11, 12, 13, 14], [20, 21], [30, 31, 32]]
    has_cls = False
    full_budget = N
    full_counts: ClassVar[list[int]] = [N, N]
    budget = 16
    unwrap_budget = 8
    dense_output = True
    served = frozenset({"vla_pruner", "fastv", "divprune", "uniform", "random", "fixed"})

    def build(self):
        return tiny_pi0()

    def inputs(self, n, seed):
        return pi0_batch(self.texts[:n], seed=seed)

    def single(self, inputs, i, seed):
        return row_of(inputs, i)

    def forward(self, model, inputs):
        with torch.no_grad():
            return model.sample_actions(**inputs)

    def generate(self, model, inputs, steps=None):
        return self.forward(model, inputs)

    def no_cache(self, model, inputs, steps):
        """``sample_actions``'s loop through ``model(...)`` with the images: the prefix recomputed at each step."""
        noise, dt = inputs["noise"], -1.0 / model.config.num_inference_steps
        rest = {k: v for k, v in inputs.items() if k != "noise"}
        with torch.no_grad():
            for step in range(model.config.num_inference_steps):
                time = torch.full((noise.shape[0],), 1.0 + step * dt)
                noise = noise + dt * model(noise=noise, timestep=time, **rest).logits
        return noise

    def can_replay(self, seen):
        return False  # the no-cache loop runs the method at each step's prefix (the same prompt: the same choice)

    def assert_batch_equals_single(self, model, inputs, seed):
        batched = self.forward(model, inputs)
        for i in range(batched.shape[0]):
            torch.testing.assert_close(self.forward(model, self.single(inputs, i, seed))[0], batched[i], atol=1e-5, rtol=1e-5)

    def assert_unpatched(self, model):
        assert not hasattr(model, "_vlmprune_handle")
        assert "sample_actions" not in vars(model) and "embed_prefix" not in vars(model.model)
        assert "get_image_features" not in vars(model.model.vlm)

    def restriction(self, row, oracle):
        from tests.cases import EXPECT

        if EXPECT[row].method not in self.served:
            return "the PI0 case runs the methods the VLA benchmark compares (VLA-Pruner, FastV, DivPrune, uniform, random) and fixed"
        return None

    def fixed_options(self, oracle):
        return {"indices": tuple(range(0, N, 1 if oracle == "keep_all" else 4))}

    def manual(self, model, inputs, handle, seen, pruned):
        ((point, _, sel),) = seen
        keep = [place_of(inputs, i, sel.keep[i]) for i in range(inputs["input_ids"].shape[0])]
        if point.stage == "projector" and handle.method.positions == "compact":
            ref = pruned_prompt_actions(model, inputs, keep)
        else:
            ref = masked_actions(model, inputs, keep, point.layer or 0)
        torch.testing.assert_close(pruned, ref, atol=1e-5, rtol=1e-5)


def place_of(inputs: dict, i: int, keep: torch.Tensor) -> torch.Tensor:
    """Row ``i``'s kept prompt positions: the image tokens ``keep`` (in keep's order, as the adapter
    places them) among every other position."""
    ids = inputs["input_ids"][i]
    image, others = (ids == IMAGE).nonzero().flatten(), (ids != IMAGE).nonzero().flatten()
    return torch.cat([others[others < image[0]], image[keep], others[others > image[-1]]])


def masked_actions(model, inputs: dict, keep: list[torch.Tensor], layer: int) -> torch.Tensor:
    """``sample_actions`` of the unwrapped model with the dropped prefix tokens hidden from every
    query (their own rows see only themselves) in the language model's layers and the action
    expert's layers from ``layer`` on: what removing them before ``layer`` with original positions
    computes."""
    length = inputs["input_ids"].shape[1]
    hidden = torch.ones(len(keep), length, dtype=torch.bool)
    for i, k in enumerate(keep):
        hidden[i, k] = False

    def hide(module, args, kwargs):
        mask = kwargs["attention_mask"].clone()
        cols = mask[..., :length]
        cols[hidden[:, None, None, :].expand_as(cols)] = False
        if mask.shape[2] == length:  # the prefix's own rows: a hidden token sees itself
            eye = torch.eye(length, dtype=torch.bool)[None, None] & hidden[:, None, :, None]
            cols[eye] = True
        kwargs["attention_mask"] = mask
        return args, kwargs

    stacks = (model.model.vlm.language_model.layers, model.model.dit.layers)
    handles = [blk.register_forward_pre_hook(hide, with_kwargs=True) for layers in stacks for blk in layers[layer:]]
    try:
        with torch.no_grad():
            return model.sample_actions(**inputs)
    finally:
        for h in handles:
            h.remove()


def pruned_prompt_actions(model, inputs: dict, keep: list[torch.Tensor]) -> torch.Tensor:
    """``sample_actions``'s steps run by hand on the prompt pruned before the language model: the
    prefix embeddings of the kept positions (left-padded), positions counted from the new padding
    mask, the prefix cached once, the expert's steps through the model's own forward."""
    with torch.no_grad():
        embeds = model.model.embed_prefix(inputs["input_ids"], inputs["pixel_values"], inputs["pixel_attention_mask"])
        width = max(k.numel() for k in keep)
        rows, masks = [], []
        for i, k in enumerate(keep):
            real = k[inputs["attention_mask"][i, k].bool()]
            pad = width - real.numel()
            rows.append(torch.cat([embeds.new_zeros(pad, embeds.shape[-1]), embeds[i, real]]))
            masks.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(real.numel(), dtype=torch.long)]))
        embeds, mask = torch.stack(rows), torch.stack(masks)
        out = model.model.vlm(inputs_embeds=embeds, attention_mask=mask, position_ids=mask.cumsum(-1) - 1,
                              token_type_ids=torch.zeros_like(mask), use_cache=True)
        cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
        length = cache.get_seq_length()
        noise, dt = inputs["noise"], -1.0 / model.config.num_inference_steps
        for step in range(model.config.num_inference_steps):
            time = torch.full((noise.shape[0],), 1.0 + step * dt)
            velocity = model(state=inputs["state"], noise=noise, timestep=time, attention_mask=mask, **{_cache_kw(model): cache}).logits
            for layer in cache.layers:
                layer.crop(length - layer.get_seq_length())
            noise = noise + dt * velocity
    return noise


def _cache_kw(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
