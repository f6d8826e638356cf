"""Shared machinery for the truth tests of DESIGN.md: reference computations done by hand
with the *unwrapped* model's own modules, and a selection recorder."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence

import torch
from transformers.masking_utils import create_causal_mask

import vlmprune
from tests.tiny import IMAGE_TOKEN


class Recorded(tuple):
    """``(point, token_index, selection)`` of one ``select`` call; ``.images``: the image of each row."""

    def __new__(cls, point, token_index, sel, images):
        obj = super().__new__(cls, (point, token_index, sel))
        obj.images = tuple(images)
        return obj


class Replay(vlmprune.Method):
    """Replays recorded selections at every point, image by image (matched by raster index):
    the no-cache reference of multi-point methods whose LLM-stage choice depends on the text."""

    name = "replay"
    stages = ("projector", "llm")  # and the encoder points it recorded

    def __init__(self, seen: list[Recorded], positions: str, llm_positions: str = "original"):
        self.seed = 0
        self.seen = seen
        self.positions = positions
        self.llm_positions = llm_positions

    def points(self, info):
        return list(dict.fromkeys(rec[0] for rec in self.seen))

    def capture_layers(self, info):
        return {"encoder": (), "llm": ()}

    def select(self, ctx):
        keeps, merged, extra = [], [], []
        for j, image in enumerate(ctx.images):
            _, token_index, sel = rec = next(r for r in self.seen if r[0] == ctx.point and image in r.images)
            keep, values, added = sel.per_image()[rec.images.index(image)]
            raster = token_index[rec.images.index(image)][keep]
            keeps.append((ctx.token_index[j][None, :] == raster[:, None]).float().argmax(-1))
            merged.append(values)
            extra.append(added)
        merged = None if all(m is None for m in merged) else merged
        extra = None if all(e is None for e in extra) else extra
        if ctx.stage in ("llm", "encoder"):
            if len({k.numel() for k in keeps}) > 1:  # per-image counts (FEATHER's grid overlap)
                return vlmprune.Selection(keep=keeps, merged=merged)
            return vlmprune.Selection(keep=torch.stack(keeps), merged=None if merged is None else torch.stack(merged))
        return vlmprune.Selection(keep=keeps, merged=merged, extra=extra, keep_cls=sel.keep_cls, merged_space=sel.merged_space)


class _RecordedView(Sequence):
    """``handle.record()``'s live list, read as :class:`Recorded` tuples."""

    def __init__(self, records):
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        r = self._records[i]
        return Recorded(r.point, r.token_index, r.selection, r.images)


@contextlib.contextmanager
def record_selections(handle):
    """Every Selection the wrapped method returns (``handle.record()``), as ``(point,
    token_index, selection)`` tuples with ``.images``."""
    with handle.record() as records:
        yield _RecordedView(records)


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
    mask2d = inputs["attention_mask"]
    return run_layers(model, full_embeddings(model, inputs), mask2d, positions_from_mask(mask2d), {k_layer: keep_positions})


def run_layers(model, embeds, mask2d, pos, prunes: dict[int, torch.Tensor], renumber: bool = False):
    """Run the unwrapped LLM layer by layer from ``embeds``; before each layer ``K`` in ``prunes``
    keep only the sequence positions ``prunes[K]`` ([B, L'], into the current sequence), with
    their position ids (``renumber``: minus the number of positions removed before each, RoPE
    recomputed). Returns logits."""
    lm = model.model.language_model
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
        if i in prunes:
            idx = prunes[i]
            hidden = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
            cos = cos.expand(idx.shape[0], -1, -1).gather(1, idx[..., None].expand(-1, -1, cos.shape[-1]))
            sin = sin.expand(idx.shape[0], -1, -1).gather(1, idx[..., None].expand(-1, -1, sin.shape[-1]))
            pos = pos.gather(1, idx)
            if renumber:
                pos = pos - (idx - torch.arange(idx.shape[1]))
                cos, sin = lm.rotary_emb(hidden, position_ids=pos)
            if mask is not None:
                mask = mask.expand(idx.shape[0], -1, -1, -1)
                mask = mask.gather(2, idx[:, None, :, None].expand(-1, 1, -1, mask.shape[-1]))
                mask = mask.gather(3, idx[:, None, None, :].expand(-1, 1, mask.shape[2], -1))
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos)
    return model.lm_head(lm.norm(hidden))


def manual_multistage(model, inputs, seen: list[Recorded], projector_tokens, renumber: bool = False) -> list[torch.Tensor]:
    """Reference logits ``[L_i, V]`` per row for a projector point (if any) followed by ``llm``
    points: each prompt is rebuilt by hand with ``projector_tokens(selection)[i]`` (or, with no
    projector point, every projected image token) as its image span (compact positions), then
    the LLM runs layer by layer, dropping at each ``llm`` point the image tokens the recorded
    selection did not keep (kept tokens keep their positions, or with ``renumber`` are numbered
    without gaps from there on)."""
    if seen[0][0].stage == "projector":
        first, rest = seen[0], seen[1:]
        tokens = projector_tokens(first[2])
    else:
        rest = seen
        embeds = full_embeddings(model, inputs)
        tokens = [embeds[i][inputs["input_ids"][i] == IMAGE_TOKEN] for i in range(embeds.shape[0])]
    assert all(rec[0].stage == "llm" for rec in rest)
    refs = []
    for i in range(inputs["input_ids"].shape[0]):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        embeds, mask, pos = pruned_prompt(model, row, [tokens[i]])
        ids = row["input_ids"][0][row["attention_mask"][0].bool()]
        start = int((ids == IMAGE_TOKEN).nonzero()[0])
        visual = torch.arange(start, start + tokens[i].shape[0])
        length, prunes = embeds.shape[1], {}
        for rec in rest:
            if i not in rec.images:
                continue
            keep, merged, _ = rec[2].per_image()[rec.images.index(i)]
            assert merged is None, "llm-stage merging is not rebuilt by hand here"
            others = torch.ones(length, dtype=torch.bool)
            others[visual] = False
            kept = torch.sort(torch.cat([others.nonzero().flatten(), visual[keep]])).values
            prunes[rec[0].layer] = kept[None]
            visual = torch.searchsorted(kept, visual[keep])
            length = kept.numel()
        refs.append(run_layers(model, embeds, mask, pos, prunes, renumber)[0])
    return refs


def greedy_no_cache(model, inputs, steps: int, image_token: int = IMAGE_TOKEN, position_ids: bool = True) -> torch.Tensor:
    """Greedy decoding that re-runs the whole prompt at every step (no KV cache). Like
    ``generate(min_new_tokens=steps, suppress_tokens=[image_token])`` it never picks EOS or the
    image placeholder. ``position_ids``: pass positions counted from the padding mask (the
    LLaVA family; Qwen-VL computes its 3-D positions itself)."""
    seq = dict(inputs)
    new = []
    for _ in range(steps):
        extra = {"position_ids": positions_from_mask(seq["attention_mask"])} if position_ids else {}
        with torch.no_grad():
            last = model(**seq, **extra, use_cache=False).logits[:, -1]
        last[:, [image_token, model.config.text_config.eos_token_id]] = float("-inf")
        nxt = last.argmax(-1, keepdim=True)
        new.append(nxt)
        seq["input_ids"] = torch.cat([seq["input_ids"], nxt], 1)
        seq["attention_mask"] = torch.cat([seq["attention_mask"], torch.ones_like(nxt)], 1)
        if "mm_token_type_ids" in seq:  # Qwen-VL (transformers >= 5.3): generated tokens are text
            seq["mm_token_type_ids"] = torch.cat([seq["mm_token_type_ids"], torch.zeros_like(nxt).to(seq["mm_token_type_ids"].dtype)], 1)
    return torch.cat(new, 1)


def hook_count(model) -> int:
    """Forward hooks and pre-hooks on every module of ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def manual_encoder_features(model, pixel_values, keeps: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Vision features ``[k, C]`` of one image (``pixel_values`` ``[1, ...]``) with patches removed by
    hand between encoder blocks: before block ``l`` keep the patches ``keep`` (indices into the
    patches alive there; CLS, when present, always stays), for each ``(l, keep)`` in ``keeps``.
    The unwrapped tower runs with this test's own pre-hooks on its blocks."""
    tower = model.model.vision_tower
    blocks = max((m for m in tower.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    has_cls = model.config.vision_config.model_type != "siglip_vision_model"
    off = int(has_cls)
    handles = []
    for layer, keep in keeps:

        def hook(module, args, kwargs, keep=keep):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            kept = torch.cat([hidden[:, :off], hidden[:, off:][:, keep]], 1)
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": kept}
            return (kept,) + args[1:], kwargs

        handles.append(blocks[layer].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        out = tower(pixel_values, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hidden = out.hidden_states[model.config.vision_feature_layer][0]
    return hidden[off:] if model.config.vision_feature_select_strategy == "default" else hidden
