"""Decoder-side mechanics shared by VLM adapters: dropping visual positions at the language
model's input and between decoder layers, for prefill and every decode step, keeping hidden
states, padding mask, position ids, RoPE cos/sin and the KV cache consistent; plus the LLM
signals (attention rows recomputed from the layer's own q and k, so SDPA stays on)."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from vlmprune.context import Point, Signals
from vlmprune.primitives.scoring import attention_rows

from .base import Installed, read_arg, write_arg
from .sequence import SeqTransform

if TYPE_CHECKING:
    from .vlm import PrefillRecord

CACHE_NAMES = ("cache", "past_key_values")  # transformers 5.24 renamed past_key_values to cache


@dataclass
class VisualLayout:
    """Where each image's surviving tokens sit in the current sequence."""

    row: torch.Tensor  # [n_img] the batch row of each image
    positions: list[torch.Tensor]  # per image: positions in the current sequence
    raster: list[torch.Tensor]  # per image: raster index in the original grid (-1: no single origin)
    totals: list[int]  # per image: visual tokens before any pruning (what fraction budgets refer to)

    def apply(self, t: SeqTransform) -> VisualLayout:
        """Follow a transform that kept every listed position (maps old positions to new ones)."""
        new_pos, raster = [], []
        for i, pos in enumerate(self.positions):
            row = int(self.row[i])
            inverse = torch.full((t.l_in,), -1, dtype=torch.long, device=pos.device)
            inverse[t.index[row][t.valid[row]]] = torch.nonzero(t.valid[row]).flatten()
            mapped = inverse[pos]
            new_pos.append(mapped[mapped >= 0])
            raster.append(self.raster[i][mapped >= 0])
        return VisualLayout(self.row, new_pos, raster, self.totals)


@dataclass
class SublayerIO:
    """The signal ``sublayer_io``: what the attention and MLP sub-layers of one decoder layer saw
    and returned at prefill, for the batch row of each image of one call (a row appears once per
    image in it). ``attn_in``: the input of ``self_attn`` (after ``input_layernorm``);
    ``attn_out``: its output before the residual add; ``mlp_in`` / ``mlp_out`` likewise for the
    MLP (after ``post_attention_layernorm``, before the residual add); each ``[n_img, L, D]`` over
    the sequence as it was at that layer. ``valid`` ``[n_img, L]``: real tokens there (not
    padding or fill). ``visual`` ``[n_img, N]``: where each current visual token (aligned with
    ``ctx.tokens``) sat in that sequence."""

    attn_in: torch.Tensor
    attn_out: torch.Tensor
    mlp_in: torch.Tensor
    mlp_out: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor


@dataclass
class DecoderState:
    """Per-prefill state kept for the decode steps that follow it."""

    input_transform: SeqTransform | None = None
    layer_transforms: dict[int, SeqTransform] = field(default_factory=dict)
    positions_mode: str = "compact"
    llm_positions: str = "original"  # numbering after an llm-stage point (see DecoderPruner)
    #: llm point -> (shift [B, L'] of each kept position, removed [B] per row), "compact" only
    renumber: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    prefill: bool = False
    layout: VisualLayout | None = None
    mask2d: torch.Tensor | None = None  # current padding mask (1 = real token) during prefill
    text_mask: torch.Tensor | None = None  # [B, L_cur] True for text (non-visual, non-pad) tokens
    captured: dict[int, dict] = field(default_factory=dict)
    sublayer: dict[int, dict] = field(default_factory=dict)  # layer -> sub-layer inputs/outputs (prefill)
    past: int = 0  # cache length before the current decode step
    memo: dict = field(default_factory=dict)
    static_width: int | None = None  # a static cache's key length (masks keep it); None: dynamic
    prompt_mask: torch.Tensor | None = None  # the prefill's 2-D padding mask before pruning (1 = real)
    fresh: bool = True  # not yet tied to the cache its prefill filled (the LM's output hook ties it)
    replay: tuple[FirstStep, int] | None = None  # (choices, generated tokens) of a later no-cache step
    first: FirstStep | None = None  # recording the choices of a generation's first no-cache step
    #: the prefill's LM input after any pruning there: (inputs_embeds, layout, text_mask)
    lm_input: tuple | None = None

    @property
    def pruned(self) -> bool:
        return self.input_transform is not None or bool(self.layer_transforms)


@dataclass
class FirstStep:
    """The choices of the first forward of a ``generate(use_cache=False)`` call: the keep mask
    at the LM input and, per ``llm`` point, the rows kept there and the merged values written
    (``(row, positions, values)``). Every later step of that call re-runs the whole prompt; it
    replays these on the prompt and keeps every generated token, which is what the cached run
    computes (a prompt position's hidden states do not depend on later tokens). Choosing again
    instead would let text-dependent methods (FastV's last-token attention) change their choice
    at every step."""

    keep: torch.Tensor  # [B, L] at the LM input
    points: dict[int, tuple[torch.Tensor, list]] = field(default_factory=dict)

    def step(self, keep: torch.Tensor) -> int:
        """How many tokens a later step's LM-input ``keep`` mask adds to the first step's."""
        b, length = self.keep.shape
        if (
            keep.shape[0] != b
            or keep.shape[1] <= length
            or not torch.equal(keep[:, :length], self.keep)
            or not bool(keep[:, length:].all())
        ):
            raise RuntimeError(
                "vlmprune: a no-cache step of generate() does not extend its first step's prompt "
                f"(first {tuple(self.keep.shape)}, now {tuple(keep.shape)}); the prompt's pruning cannot be replayed"
            )
        return keep.shape[1] - length


@dataclass
class InstructionStates:
    """Signal ``instruction_states`` for one image: keys of its tokens ``[N, H_kv * D]`` and of
    the prompt's text after it ``[T, H_kv * D]`` at a captured layer, the text tokens' hidden
    states at the point ``[T, C]``, and both token sets' places in the prompt (from its first
    real token)."""

    image_keys: torch.Tensor
    text_keys: torch.Tensor
    text_hidden: torch.Tensor
    image_places: torch.Tensor
    text_places: torch.Tensor


class Decoder:
    """Anatomy of a decoder-only language model (Llama, Qwen2, Mistral, Vicuna...)."""

    def __init__(self, language_model: nn.Module):
        self.model = language_model
        self.layers = language_model.layers
        config = language_model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        attn = self.layers[0].self_attn
        self._module = sys.modules[type(attn).__module__]
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        self.mrope_section = rope.get("mrope_section")

    def rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Apply the model's own rotary embedding (Qwen's M-RoPE when cos/sin come per axis)."""
        if cos.dim() == 4 and self.mrope_section is not None:  # transformers < 5.2x Qwen2-VL
            return self._module.apply_multimodal_rotary_pos_emb(q, k, cos, sin, self.mrope_section)
        return self._module.apply_rotary_pos_emb(q, k, cos, sin)

    def split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, heads, self.head_dim).transpose(1, 2)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own RoPE ``(cos, sin)`` for ``position_ids``."""
        return self.model.rotary_emb(hidden, position_ids=position_ids)


class DecoderPruner:
    """Installs the decoder hooks for one wrapped model and runs the ``llm``-stage points.

    ``prepare_prefill()`` is called by the model adapter (through ``on_input``) with the
    keep mask at the LM input and the visual layout; this class does the rest.

    Positions after an ``llm`` point (``runtime.llm_positions_mode()``): ``"original"`` (kept
    tokens keep their position ids; cos/sin are gathered) or ``"compact"`` (TransPrune's,
    AdaToken-3D's and FlowCut's LLaVA-NeXT code): from the point on, every kept token's position
    drops by the number of real tokens removed before it at that point, so the sequence is
    numbered without gaps, and at decode steps the new tokens' positions drop by the tokens each
    point removed, in the layers from that point on; earlier layers (whose cache holds the
    unpruned prefix) keep the unshifted positions. cos/sin are recomputed with the model's RoPE.

    Generation modes: beam search and ``num_return_sequences`` need nothing here (the runtime
    repeats the image records with the prompts). A static cache keeps its fixed length: 4-D masks
    are padded back to it with masked columns, and at decode steps rebuilt from the prefill's
    padding. Without a cache, every step of one ``generate()`` after the first replays the first
    step's choices (:class:`FirstStep`), so it equals the cached run. A decode step whose cache
    was not filled by the latest prefill raises (``_check_owner``) instead of applying that
    prefill's state to it.
    """

    def __init__(self, decoder: Decoder, runtime, points: list[Point], capture: tuple[int, ...]):
        self.decoder = decoder
        self.rt = runtime
        self.points = {p.layer: p for p in points}
        for layer in self.points:
            if not 1 <= layer < len(decoder.layers):
                raise ValueError(f"llm pruning layer must be in [1, {len(decoder.layers) - 1}], got {layer}")
        self.capture = set(capture)
        # the signal ``sublayer_io``: layers whose attention / MLP inputs and outputs are kept at prefill
        self.sublayer = set(runtime.plan.capture.get("sublayer_io", ())) if self.points else set()
        if any(not 0 <= layer < len(decoder.layers) for layer in self.sublayer):
            raise ValueError(f"sublayer_io layers must be in [0, {len(decoder.layers) - 1}], got {sorted(self.sublayer)}")
        self.state = DecoderState()
        self.first_point = min(self.points) if self.points else None
        #: cache -> the prefill state that filled it (decode steps must use their own prefill's)
        self._owners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.generating = False  # inside generate() (the VLM runtime wraps it)
        self.first_step: FirstStep | None = None  # the current generate()'s first no-cache step

    def begin_generation(self) -> None:
        """A ``generate()`` call starts: its no-cache steps share the first step's choices."""
        self.generating, self.first_step = True, None

    def end_generation(self) -> None:
        self.generating, self.first_step = False, None

    # -- install ---------------------------------------------------------------------------------
    def install(self, installed: Installed) -> None:
        installed.hook(self.decoder.model.register_forward_pre_hook(self._input_hook, with_kwargs=True))
        installed.hook(self.decoder.model.register_forward_hook(self._output_hook, with_kwargs=True))
        for idx, layer in enumerate(self.decoder.layers):
            if (self.first_point is not None and idx >= self.first_point) or idx in self.capture:
                installed.hook(layer.register_forward_pre_hook(self._layer_hook(idx), with_kwargs=True))
        for idx in self.capture:
            attn = self.decoder.layers[idx].self_attn
            for key in ("q", "k", "v"):
                proj = getattr(attn, f"{key}_proj")

                def hook(module, args, output, idx=idx, key=key):
                    if self.state.prefill:
                        self.state.captured.setdefault(idx, {})[key] = output

                installed.hook(proj.register_forward_hook(hook))
        for idx in self.sublayer:
            layer = self.decoder.layers[idx]
            for part, module in (("attn", layer.self_attn), ("mlp", layer.mlp)):

                def io_hook(module, args, kwargs, output, idx=idx, part=part):
                    if self.state.prefill:
                        c = self.state.sublayer.setdefault(idx, {"mask2d": self.state.mask2d})
                        c[f"{part}_in"] = read_arg(args, kwargs, "hidden_states", 0)
                        c[f"{part}_out"] = output[0] if isinstance(output, tuple) else output

                installed.hook(module.register_forward_hook(io_hook, with_kwargs=True))

    # -- LM input --------------------------------------------------------------------------------
    def _input_hook(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        cache = next((kwargs[n] for n in CACHE_NAMES if kwargs.get(n) is not None), None)
        past = int(cache.get_seq_length()) if cache is not None else 0
        record = self.rt.take_record()
        if past == 0:
            if record is None:
                self.state = DecoderState()
                return None
            return args, self._prefill_input(kwargs, record, cache)
        st = self.state
        self._check_owner(cache)
        st.prefill = False
        if not st.pruned:
            return None
        st.past = past
        st.memo.clear()
        st.sublayer.clear()
        t = st.input_transform
        if t is None:
            return None
        q_len = embeds.shape[1]
        mask = kwargs.get("attention_mask")
        expected = t.l_in + (past - t.l_out) + q_len
        if _mask_4d(mask) is not None:
            # generate() builds a static cache's 4-D masks from the cache's (pruned) length for some
            # models and from the unpruned positions for others: rebuilt from the prefill's padding
            prompt = st.prompt_mask if st.prompt_mask is not None else embeds.new_ones(embeds.shape[0], t.l_in)
            real = torch.cat([prompt.long(), prompt.new_ones(prompt.shape[0], expected - t.l_in).long()], 1)
            pruned = t.mask2d(real, expected)
            kwargs["attention_mask"] = _each(mask, lambda m: _decode_mask4d(pruned, past, q_len, m))
        else:
            if mask is not None and mask.shape[-1] != expected:
                raise RuntimeError(
                    f"vlmprune: decode step got an attention mask of length {mask.shape[-1]}, expected {expected} "
                    "(the prompt length before pruning plus generated tokens); was the cache reused across prompts?"
                )
            kwargs["attention_mask"] = t.mask2d(mask, expected)
        pos = kwargs.get("position_ids")
        if pos is not None and st.positions_mode == "compact":
            kwargs["position_ids"] = pos - t.dropped.view(*([1] * (pos.dim() - 2)), -1, 1)
        if pos is None and st.positions_mode == "compact" and t.dropped.unique().numel() > 1:
            base = torch.arange(t.l_in + past - t.l_out, t.l_in + past - t.l_out + q_len, device=embeds.device)
            kwargs["position_ids"] = base[None] - t.dropped[:, None]
        if pos is None and st.positions_mode == "original":
            base = torch.arange(t.l_in + past - t.l_out, t.l_in + past - t.l_out + q_len, device=embeds.device)
            kwargs["position_ids"] = base[None].expand(embeds.shape[0], -1)
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = kwargs["cache_position"] - (t.l_in - t.l_out)
        return args, kwargs

    def _output_hook(self, module, args, kwargs, output):
        """Ties the cache a prefill filled to that prefill's state (see ``_check_owner``)."""
        st = self.state
        if not st.fresh:
            return
        st.fresh = False
        fields = output.keys() if hasattr(output, "keys") else ()  # ModelOutput: its non-None fields
        cache = next((output[n] for n in CACHE_NAMES if n in fields), None)
        if cache is not None:
            self._owners[cache] = st
        return

    def _check_owner(self, cache) -> None:
        """A decode step applies the state of the latest prefill; refuse when its cache was filled
        by another prefill (manual prefill/decode loops interleaved, threads, a reused cache)."""
        owner = self._owners.get(cache)
        if owner is self.state or not (self.state.pruned or (owner is not None and owner.pruned)):
            return
        raise RuntimeError(
            "vlmprune: this decode step's cache was not filled by the latest prefill of the wrapped model "
            "(another prompt's prefill ran in between: interleaved generation loops, threads, or a reused "
            "cache), so its pruning state does not apply; run each prompt's prefill and decode steps "
            "without interleaving other prompts"
        )

    def _prefill_input(self, kwargs, record: PrefillRecord, cache):
        """``record``: the LM-input keep mask, position sources and visual layout."""
        st = DecoderState(positions_mode=record.positions, llm_positions=self.rt.llm_positions_mode(), prefill=True)
        self.state = st
        embeds = kwargs["inputs_embeds"]
        b, length = embeds.shape[:2]
        keep = record.keep
        if cache is None and self.generating:  # generate(use_cache=False)
            if self.first_step is None:
                st.first = self.first_step = FirstStep(keep)
            else:
                st.replay = (self.first_step, self.first_step.step(keep))
        mask = kwargs.get("attention_mask")
        mask4d = _mask_4d(mask)
        if mask4d is not None and cache is not None and getattr(cache, "is_compileable", False):
            st.static_width = mask4d.shape[-1]
        real = _padding_of(mask4d, length) if mask4d is not None else mask  # 2-D, 1 = real token
        st.prompt_mask = real
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(length, device=embeds.device)[None].expand(b, -1)
        elif pos.shape[-2] == 1 and b > 1:
            pos = pos.expand(*pos.shape[:-2], b, pos.shape[-1])
        layout = record.layout
        n_layers = len(self.decoder.layers)
        if st.replay is None:  # a replayed step keeps the stats of the prompt's own prefill
            self.rt.stats.llm_visual_tokens = [int(p.numel()) for p in layout.positions]
            self.rt.stats.full_lengths = [length] * b
        if bool(keep.all()):
            if st.replay is None:
                self.rt.stats.layer_lengths = [[length] * n_layers for _ in range(b)]
            st.mask2d = real if real is not None else torch.ones(b, length, dtype=torch.long, device=embeds.device)
            st.layout = layout
            st.text_mask = self._text_mask(st.mask2d, layout)
            st.lm_input = (embeds, st.layout, st.text_mask)
            kwargs["position_ids"] = pos
            return kwargs
        t = SeqTransform.from_keep(keep)
        st.input_transform = t
        if st.replay is None:
            self.rt.stats.layer_lengths = [[int(c)] * n_layers for c in keep.sum(1).tolist()]
        kwargs["inputs_embeds"] = t.seq(embeds)
        if mask4d is not None:
            kwargs["attention_mask"] = _each(mask, lambda m: t.mask4d(m, True, length, 0, width=st.static_width))
        else:
            kwargs["attention_mask"] = t.mask2d(mask, length)
        if st.positions_mode == "original":
            new_pos = _gather_last(pos, record.pos_source.gather(1, t.index))
        else:
            new_pos = _gather_last(pos, t.index) - t.dropped_before
        kwargs["position_ids"] = new_pos.masked_fill(~t.valid, 0)
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = torch.arange(t.l_out, device=embeds.device)
        st.mask2d = t.mask2d(real, length)
        if st.mask2d is None:
            st.mask2d = torch.ones(b, t.l_out, dtype=torch.long, device=embeds.device)
        st.layout = layout.apply(t)
        st.text_mask = self._text_mask(st.mask2d, st.layout)
        st.lm_input = (kwargs["inputs_embeds"], st.layout, st.text_mask)
        return kwargs

    @staticmethod
    def _text_mask(mask2d: torch.Tensor, layout: VisualLayout) -> torch.Tensor:
        text = mask2d.bool().clone()
        for i, pos in enumerate(layout.positions):
            text[int(layout.row[i]), pos] = False
        return text

    # -- decoder layers --------------------------------------------------------------------------
    def _layer_hook(self, idx: int):
        def hook(module, args, kwargs):
            st = self.state
            if st.layout is None and not st.layer_transforms:
                return None
            if st.prefill and idx in self.points:
                args, kwargs = self._prune_at(idx, args, kwargs)
            args, kwargs = self._apply_layer_transforms(idx, args, kwargs)
            if st.prefill and idx in self.capture:
                st.captured.setdefault(idx, {})["cos_sin"] = kwargs.get("position_embeddings")
                st.captured[idx]["mask2d"] = st.mask2d
            return args, kwargs

        return hook

    def _transforms_upto(self, idx: int) -> list[tuple[int, SeqTransform]]:
        """``(point layer, transform)`` of the points at or before layer ``idx``, in order."""
        return sorted((layer, t) for layer, t in self.state.layer_transforms.items() if layer <= idx)

    def _apply_layer_transforms(self, idx: int, args, kwargs):
        points = self._transforms_upto(idx)
        transforms = [t for _, t in points]
        if not transforms:
            return args, kwargs
        st = self.state
        key = len(transforms)
        if key not in st.memo:
            mask = read_arg(args, kwargs, "attention_mask", 1)
            cos_sin = kwargs.get("position_embeddings")
            pos = kwargs.get("position_ids")
            hidden = read_arg(args, kwargs, "hidden_states", 0)
            q_len = hidden.shape[1]
            extra = 0
            if not st.prefill and mask is not None:
                extra = mask.shape[-1] - transforms[0].l_in
            elif not st.prefill:
                extra = self._decode_extra(transforms[0], q_len)
            compact = st.llm_positions == "compact"
            if compact and pos is None:
                raise RuntimeError("vlmprune: renumbering positions inside the LLM needs the decoder layers' position_ids")
            for layer, t in points:
                if isinstance(mask, torch.Tensor) or mask is None:
                    mask = t.mask4d(mask, st.prefill, q_len, extra, width=st.static_width)
                if st.prefill:
                    if cos_sin is not None and not compact:
                        cos_sin = tuple(t.seq(c, dim=-2) for c in cos_sin)
                    if pos is not None:
                        pos = t.seq(pos, dim=-1)
                        if compact:
                            pos = (pos - st.renumber[layer][0]).masked_fill(~t.valid, 0)
                elif compact:
                    pos = pos - st.renumber[layer][1][:, None]
            if compact:
                cos_sin = self.decoder.rotary(hidden, pos)
            st.memo[key] = (mask, cos_sin, pos)
        mask, cos_sin, pos = st.memo[key]
        args, kwargs = write_arg(args, kwargs, "attention_mask", mask, 1)
        if cos_sin is not None:
            kwargs["position_embeddings"] = cos_sin
        if pos is not None:
            kwargs["position_ids"] = pos
        if kwargs.get("cache_position") is not None and not st.prefill:
            t = transforms[-1]
            kwargs["cache_position"] = kwargs["cache_position"] - sum(t.l_in - t.l_out for t in transforms)
        elif kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = torch.arange(transforms[-1].l_out, device=kwargs["cache_position"].device)
        return args, kwargs

    def _decode_extra(self, first: SeqTransform, q_len: int) -> int:
        """Tokens after the pruned prefix at a decode step (cached ones plus the new ones)."""
        base = self.state.input_transform.l_out if self.state.input_transform else first.l_in
        return self.state.past - base + q_len

    # -- an llm-stage point ------------------------------------------------------------------------
    def _prune_at(self, idx: int, args, kwargs):
        st = self.state
        hidden = read_arg(args, kwargs, "hidden_states", 0)
        layout = st.layout
        valid = self._current_valid()
        if st.replay is not None:  # a later no-cache step: the first step's choice, new tokens kept
            first, added = st.replay
            keep_rows, replace = first.points[idx]
            keep_rows = torch.cat([keep_rows, keep_rows.new_ones(keep_rows.shape[0], added)], 1)
        else:
            keep_rows, replace = self._choose(idx, hidden, valid, args, kwargs)
            if st.first is not None:
                st.first.points[idx] = (keep_rows, replace)
        if replace:
            hidden = hidden.clone()
            for row, positions, values in replace:
                hidden[row, positions] = values.to(hidden.dtype)
        t = SeqTransform.from_keep(keep_rows)
        st.layer_transforms[idx] = t
        if st.llm_positions == "compact":
            removed = ~keep_rows & (valid if valid is not None else torch.ones_like(keep_rows))
            st.renumber[idx] = (removed.long().cumsum(1).gather(1, t.index), removed.sum(1))
        if st.replay is None:
            for row, count in enumerate(keep_rows.sum(1).tolist()):
                lengths = self.rt.stats.layer_lengths[row]
                lengths[idx:] = [int(count)] * (len(lengths) - idx)
        st.memo.clear()
        st.mask2d = st.mask2d.gather(1, t.index) * t.valid.to(st.mask2d.dtype)
        st.layout = layout.apply(t)
        st.text_mask = self._text_mask(st.mask2d, st.layout)
        return write_arg(args, kwargs, "hidden_states", t.seq(hidden), 0)

    def _choose(self, idx: int, hidden: torch.Tensor, valid: torch.Tensor | None, args, kwargs):
        """Run the method at the ``llm`` point before layer ``idx``: the rows' keep mask over the
        current sequence and the merged values to write, ``[(row, positions, values)]``."""
        st = self.state
        layout = st.layout
        point = self.points[idx]
        keep_rows = valid.clone() if valid is not None else torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        replace: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        grids = getattr(self.rt, "image_grids", None)  # per image where images differ in shape (Qwen-VL)
        ahead: dict = {}
        for group in _groups_by_count(layout, grids):
            rows = layout.row[group]
            pos = torch.stack([layout.positions[i] for i in group])
            tokens = hidden[rows[:, None], pos]
            raster = torch.stack([layout.raster[i] for i in group])
            self.rt.n_visual = layout.totals[group[0]]
            if grids is not None:
                self.rt.grid = grids[group[0]]
            signals = self._llm_signals(idx, group, pos, tokens, lambda: self._project_ahead(idx, hidden, args, kwargs, ahead), hidden)
            sel = self.rt.run(point, tokens, raster, signals, group).selection
            for j, (keep, merged, _) in enumerate(sel.per_image()):  # counts may differ per image
                row = int(layout.row[group[j]])
                order = torch.argsort(keep)
                keep = keep[order]
                drop = torch.ones(pos.shape[1], dtype=torch.bool, device=hidden.device)
                drop[keep] = False
                keep_rows[row, pos[j][drop]] = False
                if merged is not None:
                    replace.append((row, pos[j][keep], merged[order]))
        return keep_rows, replace

    def _current_valid(self) -> torch.Tensor | None:
        st = self.state
        valid = st.input_transform.valid if st.input_transform is not None else None
        for _, t in sorted(st.layer_transforms.items()):
            valid = t.valid if valid is None else valid.gather(1, t.index) & t.valid
        return valid

    def _project_ahead(self, idx: int, hidden: torch.Tensor, args, kwargs, memo: dict) -> dict:
        """What a capture of layer ``idx`` would hold, for the layer about to run at this point:
        its own input norm and q/k/v projections applied to the current hidden states (before
        this point prunes), with the current sequence's cos/sin (computed once per point)."""
        if "q" not in memo:
            layer = self.decoder.layers[idx]
            x = layer.input_layernorm(hidden)
            attn = layer.self_attn
            _, current = self._apply_layer_transforms(idx, args, dict(kwargs))  # earlier points' gathers
            memo.update(q=attn.q_proj(x), k=attn.k_proj(x), v=attn.v_proj(x), cos_sin=current.get("position_embeddings"), mask2d=self.state.mask2d)
        return memo

    def _llm_signals(self, idx: int, group: list[int], pos: torch.Tensor, tokens: torch.Tensor, ahead: Callable[[], dict],
                     hidden: torch.Tensor) -> Signals:
        st = self.state
        layout = st.layout
        rows = layout.row[group]
        cap_layer = idx - 1

        def captured(layer: int) -> dict:
            if layer == idx:  # the layer about to run: projected on demand
                return ahead()
            if layer not in st.captured or "q" not in st.captured[layer]:
                raise KeyError(f"LLM layer {layer} was not captured; captured: {sorted(st.captured)} (and {idx}, the next layer)")
            return st.captured[layer]

        def qkv(layer: int = cap_layer):
            c = captured(layer)
            d = self.decoder
            q, k, v = d.split(c["q"], d.heads), d.split(c["k"], d.kv_heads), d.split(c["v"], d.kv_heads)
            cos, sin = c["cos_sin"]
            q, k = d.rope(q, k, cos, sin)
            return q, k, v

        def text_attention(layer: int = cap_layer, query="last", rope: bool = True, reduce: str = "mean",
                           per_query: bool = False, divide_rope: bool = False):
            """Attention that the prompt's last token (``query="last"``), its text tokens after
            the image (``"instruction"``) or the image's own tokens (``"visual"``: the column
            means of the visual -> visual block, O(N^2) per head; ATP's self-modality score) pay
            to each image token at LLM layer ``layer``, mean over the query rows,
            ``[n_img, N]`` (``reduce="none"``: per head, ``[n_img, H, N]``). ``query`` may also
            be a tuple with one 1-D index tensor per image of the call, naming the row's text
            tokens counted back from its last one (0: the last text token; pruning inside the LLM
            never moves them: SparseVLM's raters). ``per_query=True`` keeps the query rows: a
            list with one ``[Q, N]`` (``reduce="none"``: ``[H, Q, N]``) per image.
            ``divide_rope=True`` divides each probability by the scaled logit that all-ones
            queries and keys get from the rotary embedding alone at those two positions (the
            "attention gravity" correction of SparseVLM+). ``rope=False``
            recomputes it without rotary embeddings (FEATHER). ``layer`` may be a captured layer
            or this point's own layer ``K`` (its projections applied to the current hidden states:
            the "next layer" of PyramidDrop-style methods)."""
            if reduce not in ("mean", "sum", "none"):
                raise ValueError(f"reduce must be one of 'mean', 'sum', 'none', got {reduce!r}")
            if not isinstance(query, str) and len(query) != len(group):
                raise ValueError(f"query as index tensors needs one per image of the call ({len(group)}), got {len(query)}")
            if rope:
                q, k, _ = qkv(layer)
            else:
                c, d = captured(layer), self.decoder
                q, k = d.split(c["q"], d.heads), d.split(c["k"], d.kv_heads)
            mask2d = captured(layer).get("mask2d", st.mask2d).bool()
            length = mask2d.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
            if divide_rope:
                ones = q.new_ones(q.shape[0], 1, length, q.shape[-1])
                ones_q, ones_k = self.decoder.rope(ones, ones, *captured(layer)["cos_sin"])
            out = []
            for j, img in enumerate(group):
                row = int(rows[j])
                if not isinstance(query, str):
                    text = st.text_mask[row].nonzero().flatten().flip(0)
                    qpos = text[query[j].to(text.device)]
                elif query == "last":
                    qpos = mask2d[row].nonzero().max().view(1)
                elif query == "instruction":
                    after = torch.zeros(length, dtype=torch.bool, device=q.device)
                    after[int(pos[j].max()) + 1 :] = True
                    qpos = (st.text_mask[row] & after).nonzero().flatten()
                    if qpos.numel() == 0:
                        qpos = mask2d[row].nonzero().max().view(1)
                elif query == "visual":
                    qpos = pos[j]
                else:
                    raise ValueError(f"query must be one of 'last', 'instruction', 'visual', got {query!r}")
                key_mask = (causal[qpos] & mask2d[row][None])[None]
                probs = attention_rows(q[row : row + 1, :, qpos], k[row : row + 1], self.decoder.head_dim**-0.5, key_mask)
                probs = probs[0][:, :, pos[j]]  # [H, Q, N]
                if divide_rope:
                    probs = probs / (ones_q[row, :, qpos] @ ones_k[row, :, pos[j]].transpose(-1, -2) * self.decoder.head_dim**-0.5)
                if reduce == "none":
                    out.append(probs if per_query else probs.mean(1))
                    continue
                red = probs.mean(0) if reduce == "mean" else probs.sum(0)
                out.append(red if per_query else red.mean(0))
            return out if per_query else torch.stack(out)

        def llm_input() -> list[tuple[torch.Tensor, torch.Tensor]]:
            """Per image of the call: the prefill's LM input (``inputs_embeds``, after any pruning
            at the LM input) of the image's tokens there ``[N_in, C]`` and of the row's text tokens
            after the image ``[T, C]``, in sequence order (SparseVLM's raters)."""
            embeds, layout0, text0 = st.lm_input
            out = []
            for j, img in enumerate(group):
                row, places = int(rows[j]), layout0.positions[img]
                after = torch.zeros_like(text0[row])
                after[int(places.max()) + 1 :] = True
                out.append((embeds[row, places], embeds[row, (text0[row] & after).nonzero().flatten()]))
            return out

        def relay_qkv(layer: int = cap_layer):
            """Per image of the call, LLM layer ``layer``'s per-head queries and keys (after RoPE)
            and values of the prompt's last token (row 0) followed by the image's current tokens
            (rows 1..N), ``[n_img, H, 1 + N, D]`` each, grouped-query keys and values repeated to
            the query heads (FlowCut's last-token relay)."""
            q, k, v = qkv(layer)
            mask2d = captured(layer).get("mask2d", st.mask2d).bool()
            rep = q.shape[1] // k.shape[1]
            out = []
            for j in range(len(group)):
                row = int(rows[j])
                idx = torch.cat([mask2d[row].nonzero().max().view(1), pos[j].to(q.device)])
                out.append(tuple(t[row][:, idx] for t in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))))
            return tuple(torch.stack(t) for t in zip(*out))

        def instruction_states(layer: int = cap_layer) -> list[InstructionStates]:
            """Per image of the call: LLM layer ``layer``'s keys (after RoPE, heads concatenated)
            of the image's current tokens and of the prompt's text tokens after the image, those
            text tokens' hidden states at this point (the input of its layer), and every token's
            place counted from the row's first real token (DART's pivots)."""
            _, k, _ = qkv(layer)
            mask2d = captured(layer).get("mask2d", st.mask2d).bool()
            out = []
            for j in range(len(group)):
                row = int(rows[j])
                after = torch.zeros_like(mask2d[row])
                after[int(pos[j].max()) + 1 :] = True
                text = (st.text_mask[row] & after).nonzero().flatten()
                first = int(mask2d[row].nonzero().min())
                keys = k[row].transpose(0, 1).flatten(1)  # [L, H_kv * D]
                out.append(InstructionStates(keys[pos[j]], keys[text], hidden[row, text], pos[j] - first, text - first))
            return out

        def sublayer_io(layer: int = cap_layer) -> SublayerIO:
            """The attention and MLP sub-layers' inputs and outputs at decoder layer ``layer``
            (captured at prefill; the method lists the layers under ``"sublayer_io"`` in
            ``capture_layers``) for the batch rows of this call's images."""
            if layer not in st.sublayer or "mlp_out" not in st.sublayer[layer]:
                raise KeyError(f"sub-layers of LLM layer {layer} were not captured; captured: {sorted(st.sublayer)}")
            c = st.sublayer[layer]
            visual = []
            for j in range(len(group)):
                p = pos[j]
                for at, t in sorted(st.layer_transforms.items(), reverse=True):
                    if at > layer:  # pruned after the capture: follow the kept tokens back
                        p = t.index[int(rows[j]), p]
                visual.append(p)
            pick = lambda x: x[rows]
            return SublayerIO(
                pick(c["attn_in"]), pick(c["attn_out"]), pick(c["mlp_in"]), pick(c["mlp_out"]),
                valid=pick(c["mask2d"]).bool(), visual=torch.stack(visual),
            )

        return Signals(
            {
                "text_attention": text_attention,
                "llm_qkv": qkv,
                "relay_qkv": relay_qkv,
                "instruction_states": instruction_states,
                "llm_norm": lambda: self.decoder.model.norm,
                "llm_input": llm_input,
                "hidden": lambda: tokens,
                "sublayer_io": sublayer_io,
            }
        )


def _mask_4d(mask) -> torch.Tensor | None:
    """The 4-D mask a language model got (generate() builds them for static caches; Qwen-VL's
    come as a dict per attention type: the first), or None for a 2-D or absent one."""
    if isinstance(mask, dict):
        mask = next(iter(mask.values()), None)
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 4 else None


def _each(mask, fn):
    """``fn`` applied to a mask, or to each mask of a dict of them."""
    return {k: fn(v) for k, v in mask.items()} if isinstance(mask, dict) else fn(mask)


def _decode_mask4d(pruned: torch.Tensor, past: int, q_len: int, like: torch.Tensor) -> torch.Tensor:
    """A decode step's 4-D mask ``like`` (width: the static cache's length) from the 2-D padding
    mask of the pruned sequence ``pruned [B, past + q_len]``: each new token sees the real tokens
    up to itself."""
    width = like.shape[-1]
    cols = torch.arange(width, device=pruned.device)
    allowed = cols[None] <= past + torch.arange(q_len, device=pruned.device)[:, None]  # [Q, W]
    real = torch.zeros(pruned.shape[0], width, dtype=torch.bool, device=pruned.device)
    real[:, : pruned.shape[1]] = pruned.bool()
    allowed = (allowed[None] & real[:, None])[:, None]  # [B, 1, Q, W]
    if like.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(~allowed, torch.finfo(like.dtype).min)


def _padding_of(mask: torch.Tensor, length: int) -> torch.Tensor:
    """The 2-D padding mask (1 = real token) of a prefill's 4-D mask ``[B, 1, L, W]`` (generate()
    builds one for static caches): a real token attends to itself, a padding position to nothing."""
    diag = torch.diagonal(mask[:, 0, :, :length], dim1=-2, dim2=-1)
    return (diag if diag.dtype == torch.bool else diag == 0).long()


def _gather_last(pos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather position ids ``[..., B, L]`` (Qwen's are ``[3 or 4, B, L]``) with ``index [B, L']``."""
    return pos.gather(-1, index.expand(*pos.shape[:-2], *index.shape))


def _groups_by_count(layout: VisualLayout, grids: list | None = None) -> list[list[int]]:
    """Images that can share one method call: same alive count, same original count (and the
    same grid, where the adapter gives one per image)."""
    groups: dict[tuple, list[int]] = {}
    for i, pos in enumerate(layout.positions):
        key = (int(pos.numel()), layout.totals[i], tuple(grids[i]) if grids is not None else None)
        groups.setdefault(key, []).append(i)
    return list(groups.values())
