"""The adapter for transformers' PI0 (``PI0ForConditionalGeneration``, transformers >= 5.17): a
PaliGemma prefix (SigLIP tower -> projector -> Gemma, attention bidirectional over the prefix)
whose per-layer KV cache an action expert (a second Gemma of the same depth) reads at every
flow-matching denoising step of ``sample_actions``.

Stages (family ``"pi0"``):

* ``projector`` (boundary): each camera image's projected tokens, before the language model.
  Kept tokens fill the first slots of the image's placeholder span (the model's ``embed_prefix``
  needs every slot); the language model's input hook removes the unused ones, as on LLaVA.
* ``llm`` layer K (inside): before Gemma layer K at the prefix's prefill; later layers (and their
  cache) hold the kept tokens only. Positions of tokens kept inside the LLM stay original.

The action expert attends to the pruned prefix cache: at every denoising step its 2-D padding
mask is cut to the layer-0 cache, its 4-D mask's prefix columns are gathered at each expert
layer from K on (the same gather as a VLM's decode step), and its positions are the unwrapped
model's (``positions="original"``) or lowered by the tokens removed before the LLM
(``"compact"``). Each cache layer is cut back to its own prefix length before every step
(transformers 5.17 crops every layer to layer 0's length).

VLA-Pruner's action-level signal ``action_history`` (the card's is OpenVLA's decoded action
tokens; this adaptation to PI0 is ours, not the card's): at the expert layer the method names
under ``"action"`` in ``capture_layers``, the attention of the action queries (the last
``chunk_size`` positions of the suffix; the state token is not an action) to the prefix's image
keys, recomputed from that layer's q and the cached keys after RoPE (SDPA stays on), averaged
over heads and action queries, then over the denoising steps of one ``sample_actions`` call: one
``[n_img, N]`` vector per camera image on its raster grid (tokens pruned before that layer: 0),
appended to the episode's :class:`~vlmprune.adapters.vla.ActionHistory` when the call returns.
``handle.reset()`` starts the next episode.

A batch row may carry several cameras (``pixel_attention_mask`` marks the real ones); each real
camera is one image with its own budget. ``model(state, input_ids=..., pixel_values=...)`` (the
training forward, prefix and one expert step in one call) is served by running the prefix first
in a pre-hook, so its expert step reads the pruned cache like ``sample_actions``'s.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import replace

import torch
from torch import nn

from vlmprune.context import ModelInfo, Point, Signals, VLMInfo, vlm_stages
from vlmprune.method import Method
from vlmprune.primitives.scoring import attention_rows
from vlmprune.stats import Stats

from .base import Adapter, Installed, Plan, llm_cost, read_arg, register_adapter
from .decoder import CACHE_NAMES, Decoder, DecoderPruner
from .vla import HISTORY_KEY, ActionHistory
from .vlm import ImageRecord, VLMRuntime, check_llm_attention, position_options

#: the signals the PI0 adapter provides
SIGNALS = ("action_history", "hidden", "instruction_states", "llm_input", "llm_norm", "llm_qkv", "projected", "projector",
           "projector_input", "relay_qkv", "sublayer_io", "text_attention")
#: ``positions`` both ways; inside the LLM original only (the expert's rotary tables are not renumbered per layer)
OPTIONS = {**position_options(), "llm_positions": position_options(("original",))["llm_positions"]}


def _cache_of(kwargs: dict):
    return next((kwargs[n] for n in CACHE_NAMES if kwargs.get(n) is not None), None)


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D attention mask as booleans (True = may attend)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


class PI0DecoderPruner(DecoderPruner):
    """The LLaVA-family decoder mechanics on PI0's prefix, plus ``text_attention(query="all")`` over
    the bidirectional prefix, ``projected`` and ``action_history`` at ``llm`` points."""

    def _prefill_input(self, kwargs, record, cache):
        kwargs = super()._prefill_input(kwargs, record, cache)
        self.embeds = kwargs["inputs_embeds"]  # the LM input after pruning there
        return kwargs

    def _llm_signals(self, idx, group, pos, tokens, ahead, hidden) -> Signals:
        base = super()._llm_signals(idx, group, pos, tokens, ahead, hidden)
        st = self.state
        rows = st.layout.row[group]

        def text_attention(layer: int = idx - 1, query="last", **kwargs):
            """The LLaVA adapter's ``query="last"`` (the prompt's last token sees every key in a
            causal or a bidirectional prefix alike) and ``query="all"``: the mean over every real
            query row of the bidirectional prefix (VLA-Pruner's prefill criterion), ``[n_img, N]``.
            The other queries assume a causal prefix and are refused."""
            if query == "last":
                return base.get("text_attention", layer=layer, query=query, **kwargs)
            if query != "all" or kwargs:
                raise ValueError(f"text_attention on PI0's bidirectional prefix takes query 'last' (any option) or 'all' "
                                 f"(no option), got query={query!r} with {sorted(kwargs)}")
            q, k, _ = base.get("llm_qkv", layer=layer)
            mask2d = st.captured.get(layer, {}).get("mask2d", st.mask2d).bool()
            out = []
            for j in range(len(group)):
                row = int(rows[j])
                qpos = mask2d[row].nonzero().flatten()
                probs = attention_rows(q[row : row + 1, :, qpos], k[row : row + 1], self.decoder.head_dim**-0.5, mask2d[row][None, None])
                out.append(probs[0][:, :, pos[j]].mean(0).mean(0))
            return torch.stack(out)

        def projected():
            """The image tokens' LLM input embeddings ``[n_img, N, D]`` (followed back through earlier points)."""
            out = []
            for j in range(len(group)):
                p, row = pos[j], int(rows[j])
                for _, t in sorted(st.layer_transforms.items(), reverse=True):
                    p = t.index[row, p]
                out.append(self.embeds[row, p])
            return torch.stack(out)

        def action_history():
            """The episode's earlier control steps, oldest first: ``[n_img, N]`` each, per camera image."""
            return self.rt.history().select(group, len(st.layout.positions), "camera images", "an episode keeps its batch and cameras")

        providers = {name: (lambda name=name, **kw: base.get(name, **kw)) for name in base.available()}
        return Signals({**providers, "text_attention": text_attention, "projected": projected, "action_history": action_history})


class PI0Runtime(VLMRuntime):
    decoder_class = PI0DecoderPruner

    def __init__(self, plan: Plan, info: ModelInfo, adapter: PI0Adapter):
        super().__init__(plan, info, adapter)
        self.cameras: torch.Tensor | None = None  # [B * cameras] real cameras of the current prefix
        self.pixel_values: torch.Tensor | None = None
        #: cache -> each layer's prefix length (cut back to before every expert step)
        self.prefix: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.expert_positions: torch.Tensor | None = None
        self.action_layout = None  # (decoder state, layout) at the action layer's prefill
        actions = tuple(plan.capture.get("action", ()))
        if len(actions) > 1 or any(not 0 <= a < info.llm_layers for a in actions):
            raise ValueError(f"the action-attention layer must be one layer in [0, {info.llm_layers - 1}], got {actions}")
        self.action_layer = actions[0] if actions else None

    # -- the episode (VLA-Pruner's history) -----------------------------------------------------------
    def history(self) -> ActionHistory:
        return self.session.state.setdefault(HISTORY_KEY, ActionHistory())

    def finish_step(self) -> None:
        history = self.session.state.get(HISTORY_KEY)
        if history is not None:
            history.finish()

    def begin(self, n_visual, grid, device) -> None:
        self.finish_step()  # a control step run by a plain forward ends when the next one starts
        super().begin(n_visual, grid, device)

    # -- install ------------------------------------------------------------------------------------
    def install(self, installed: Installed) -> None:
        a = self.adapter
        llm_points = [p for p in self.plan.points if p.stage == "llm"]
        capture = tuple(sorted(self.plan.capture.get("llm", ()))) if llm_points else ()
        self.decoder = self.decoder_class(a.decoder, self, llm_points, capture)
        self.decoder.install(installed)
        installed.set_attribute(a.vlm, "get_image_features", self.image_features)
        installed.set_attribute(a.pi0, "embed_prefix", self._embed_prefix(a.pi0.embed_prefix))
        installed.set_attribute(a.model, "sample_actions", self._sample_actions(a.model.sample_actions))
        installed.hook(a.pi0.register_forward_pre_hook(self.on_step, with_kwargs=True))
        installed.hook(a.expert.model.register_forward_pre_hook(self.on_expert_input, with_kwargs=True))
        first = self.decoder.first_point
        for idx, layer in enumerate(a.expert.layers):
            if first is not None and idx >= first:  # the LM's own gather, as at a decode step
                installed.hook(layer.register_forward_pre_hook(self.decoder._layer_hook(idx), with_kwargs=True))
        if self.action_layer is not None:
            lm_layer = a.decoder.layers[self.action_layer]
            installed.hook(lm_layer.register_forward_pre_hook(self._note_action_layout, with_kwargs=True))
            attn = a.expert.layers[self.action_layer].self_attn
            installed.hook(attn.register_forward_hook(self._capture_action, with_kwargs=True))

    def _sample_actions(self, original):
        @functools.wraps(original)
        def sample_actions(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            finally:
                self.finish_step()  # one control step: its denoising steps' rows become one history entry

        return sample_actions

    def _embed_prefix(self, original):
        core = self.adapter.vlm

        @functools.wraps(original)
        def embed_prefix(input_ids, pixel_values, pixel_attention_mask, *args, **kwargs):
            self.input_ids = input_ids
            self.image_mask = input_ids == core.config.image_token_id
            self.cameras = pixel_attention_mask.flatten().bool()
            self.pixel_values = pixel_values.flatten(0, 1)
            try:
                return original(input_ids, pixel_values, pixel_attention_mask, *args, **kwargs)
            finally:
                self.cameras = self.pixel_values = None

        return embed_prefix

    # -- the prefix's images --------------------------------------------------------------------------
    def image_features(self, pixel_values, **kwargs):
        a = self.adapter
        out = type(a.vlm).get_image_features(a.vlm, pixel_values, **kwargs)
        feats, vision = out.pooler_output, out.last_hidden_state
        real = self.cameras if self.cameras is not None else torch.ones(feats.shape[0], dtype=torch.bool)
        real = real.to(feats.device)
        n = feats.shape[1]
        side = round(n**0.5)
        self.begin(n, (side, side), feats.device)
        tokens, raster = feats[real], torch.arange(n, device=feats.device).expand(int(real.sum()), -1)
        kept, kept_raster = list(tokens), list(raster)
        if any(p.stage == "projector" for p in self.plan.points):
            inputs = vision[real]
            signals = Signals(
                {
                    "hidden": lambda: tokens,
                    "projected": lambda: tokens,
                    "projector": lambda: a.vlm.multi_modal_projector,
                    "projector_input": lambda: inputs,
                }
            )
            red = self.run(Point("projector"), tokens, raster, signals)
            kept, kept_raster = red.tokens(tokens, spaces=("tokens", "projected")), red.apply(raster)
            kept, kept_raster = [kept[i] for i in range(len(kept))], [kept_raster[i] for i in range(len(kept))]
            for i, (_, _, extra) in enumerate(red.selection.per_image()):
                if extra is not None:
                    kept[i] = torch.cat([kept[i], extra.to(feats.dtype)])
                    kept_raster[i] = torch.cat([kept_raster[i], kept_raster[i].new_full((extra.shape[0],), -1)])
        filled = feats.clone()
        for i, row in enumerate(real.nonzero().flatten().tolist()):
            if kept[i].shape[0] > n:
                raise RuntimeError(f"method {self.method.name!r} produced {kept[i].shape[0]} tokens for {n} image slots")
            filled[row] = torch.cat([kept[i], feats.new_zeros(n - kept[i].shape[0], feats.shape[2])])
        self.slots = [n] * len(kept)
        self.images = [ImageRecord(f.shape[0], r, n) for f, r in zip(kept, kept_raster)]
        out.pooler_output = filled
        return out

    # -- the action expert ------------------------------------------------------------------------------
    def on_step(self, module, args, kwargs):
        """``PI0Model.forward``: one expert step. A training forward's prefix is run here first;
        then the cache is cut back to the prefix, the 2-D mask to the layer-0 cache, and the
        expert's positions are set (:meth:`on_expert_input` passes them on)."""
        cache = _cache_of(kwargs)
        a = self.adapter
        if kwargs.get("pixel_values") is not None and cache is None:
            mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
            if mask is not None and pos is None:
                pos = mask.cumsum(-1) - 1
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                embeds = module.embed_prefix(kwargs["input_ids"], kwargs["pixel_values"], kwargs["pixel_attention_mask"])
            out = a.vlm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, token_type_ids=torch.zeros_like(embeds[..., 0]),
                        use_cache=True)
            cache = next(out[n] for n in CACHE_NAMES if n in out)
            kwargs.update(pixel_values=None, inputs_embeds=None, position_ids=None, **{a.cache_name: cache})
        self.expert_positions = None
        st = self.decoder.state
        if cache is None or st.layout is None:
            return args, kwargs
        self.decoder._check_owner(cache)
        st.prefill = False  # the expert's layers read the prefix like a decode step
        st.memo.clear()
        if not st.pruned:
            return args, kwargs
        lengths = self.prefix.setdefault(cache, [layer.get_seq_length() for layer in cache.layers])
        for layer, length in zip(cache.layers, lengths):
            if layer.get_seq_length() > length:
                layer.crop(length - layer.get_seq_length())  # negative: tokens to remove (5.17 and 5.25)
        action = read_arg(args, kwargs, "action_embeds", 0)
        n = action.shape[1]
        mask = kwargs.get("attention_mask")
        t = st.input_transform
        full = t.l_in if t is not None else lengths[0]
        if mask is not None:
            pos = torch.cat([mask, mask.new_ones(mask.shape[0], n)], 1).cumsum(1)[:, -n:] - 1
        else:
            pos = torch.arange(full, full + n, device=action.device)[None].expand(action.shape[0], -1)
        if t is not None:
            if st.positions_mode == "compact":
                pos = pos - t.dropped[:, None]
            kwargs["attention_mask"] = t.mask2d(mask, full)
        self.expert_positions = pos
        st.past = lengths[0]
        return args, kwargs

    def on_expert_input(self, module, args, kwargs):
        if self.expert_positions is not None:
            kwargs["position_ids"] = self.expert_positions
            return args, kwargs
        return None

    def _note_action_layout(self, module, args, kwargs):
        st = self.decoder.state
        if st.prefill and st.layout is not None:
            self.action_layout = (st, st.layout)

    def _capture_action(self, module, args, kwargs, output) -> None:
        """The action queries' attention to the image keys at the action layer, one row per
        camera image on its raster grid (heads and action queries averaged)."""
        st = self.decoder.state
        if self.action_layout is None or self.action_layout[0] is not st:
            return
        layout = self.action_layout[1]
        e = self.adapter.expert
        chunk = self.adapter.config.chunk_size
        hidden = read_arg(args, kwargs, "hidden_states", 0)[:, -chunk:]
        cos, sin = read_arg(args, kwargs, "position_embeddings", 1)
        mask = read_arg(args, kwargs, "attention_mask", 2)
        keys = _cache_of(kwargs).layers[self.action_layer].keys
        with torch.no_grad():
            q = e.split(module.q_proj(hidden), e.heads)
            q, _ = e.rope(q, q, cos[..., -chunk:, :], sin[..., -chunk:, :])
            allowed = None if mask is None else _allowed(mask)[:, 0, -chunk:]
            probs = attention_rows(q, keys, getattr(module, "scaling", e.head_dim**-0.5), allowed)  # [B, H, chunk, Lk]
            row = probs.mean(1).mean(1)
        vec = row.new_zeros(len(layout.positions), max(layout.totals))
        for i, (r, places, raster) in enumerate(zip(layout.row.tolist(), layout.positions, layout.raster)):
            grid = raster >= 0
            vec[i, raster[grid]] = row[r, places[grid]]
        self.history().rows.append(vec)


@register_adapter
class PI0Adapter(Adapter):
    """transformers' ``PI0ForConditionalGeneration`` (module docstring)."""

    model_types = ("pi0",)
    stages = ("projector", "llm")
    options = OPTIONS
    calls = ("forward", "generate", "sample_actions")  # sample_actions: one control step

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if not hasattr(model, "sample_actions"):
            raise TypeError(f"the PI0 adapter wraps PI0ForConditionalGeneration, got {type(model).__name__}")
        self.pi0 = model.model
        self.vlm = self.pi0.vlm
        self.decoder = Decoder(self.vlm.language_model)
        self.expert = Decoder(self.pi0.dit)
        self.config = model.config
        self.cache_name = "cache" if "cache" in inspect.signature(type(self.pi0).forward).parameters else "past_key_values"

    def info(self) -> VLMInfo:
        vc, tc = self.config.vlm_config.vision_config, self.config.vlm_config.text_config
        side = vc.image_size // vc.patch_size
        stages = vlm_stages(self.stages)
        stages["llm"] = replace(stages["llm"], layers=range(1, tc.num_hidden_layers))
        return VLMInfo("pi0", side * side, (side, side), False, vc.num_hidden_layers, vc.num_hidden_layers - 1,
                       tc.num_hidden_layers, stages=stages, signals=SIGNALS)

    def cost(self, stats: Stats) -> dict:
        return llm_cost(self.decoder, self.config.vlm_config.text_config, stats)

    def check_plan(self, method: Method, points: list[Point]) -> None:
        check_llm_attention(self.model, method, points)
        if self.config.dit_config.num_hidden_layers != len(self.decoder.layers):
            raise ValueError("the PI0 adapter needs an action expert as deep as the language model (their caches are shared by layer)")

    def install(self, plan: Plan) -> Installed:
        installed = Installed()
        rt = PI0Runtime(plan, self.info(), self)
        rt.install(installed)
        self.runtime = rt
        return installed
