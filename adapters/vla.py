"""The adapter for OpenVLA-style policies (:class:`vlmprune.vla.VLAPolicy` around a transformers
``LlavaForConditionalGeneration``): the LLaVA adapter's stages, plus what a policy adds.

* The session is the episode: ``ctx.step`` counts control steps (one per prefill with an
  image), ``handle.reset()`` starts the next episode.
* The action decoding's attention, captured during ``generate`` when the method reads the
  signal ``action_history`` (at the layer the method names under ``"action"`` in
  :meth:`~vlmprune.Method.capture_layers`; VLA-Pruner: 15 of 32): at every forward of a control
  step, the attention row of the query that produces the next action id (the prompt's last token
  at prefill, then each decode step's new token) over the image tokens, recomputed from that
  layer's own q and k after RoPE (so SDPA stays on), averaged over heads; image tokens pruned
  before that layer get 0. When the step ends (the next step starts, or ``generate`` returns) its
  rows are averaged into one vector ``[B, N]`` on the image's raster grid and appended to the
  episode's history (``ctx.state.session["vla"]``, an :class:`ActionHistory`), which the signal
  hands to the next steps.
* At ``llm`` points two more signals: ``projected`` (the image tokens' LLM input embeddings, the
  projector's outputs) and ``text_attention(query="all")`` (the mean over every real query row of
  the prompt, BOS, image and text: VLA-Pruner's prefill criterion).

One image per prompt; a batch of prompts is a batch of episodes run side by side (each row its
own history); greedy decoding (beam search would mix the rows' histories).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmprune.context import Signals
from vlmprune.method import SIGNALS as METHOD_SIGNALS
from vlmprune.primitives.scoring import attention_rows
from vlmprune.vla import VLAPolicy

from .base import read_arg, register_adapter
from .decoder import DecoderPruner
from .llava import LlavaAdapter, LlavaRuntime

#: the key of the episode's :class:`ActionHistory` in ``ctx.state.session``
HISTORY_KEY = "vla"
#: every signal of the LLaVA adapter, and ``action_history``
SIGNALS = tuple(sorted(METHOD_SIGNALS - {"mixer_backward", "cls_position", "sizes"}))


@dataclass
class ActionHistory:
    """An episode's record of the action decoding's attention to the image (session scope).
    ``steps``: one ``[B, N]`` vector per finished control step, oldest first (heads and action
    queries averaged); ``rows``: the current step's rows so far, ``[B, N]`` each."""

    steps: list[torch.Tensor] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)

    def finish(self) -> None:
        """Close the current step: its rows' mean becomes the newest entry of ``steps``."""
        if self.rows:
            self.steps.append(torch.stack(self.rows).mean(0))
            self.rows = []

    def select(self, index, count: int, unit: str, keeps: str) -> list[torch.Tensor]:
        """The finished steps, oldest first, each indexed by ``index``; a RuntimeError if an earlier
        step ran another number of rows than ``count`` (``unit``: what a row is; ``keeps``: what an
        episode must keep)."""
        if any(s.shape[0] != count for s in self.steps):
            raise RuntimeError(
                f"this episode's earlier steps ran {self.steps[0].shape[0]} {unit}, this one {count}: {keeps}; "
                "call handle.reset() to start new episodes"
            )
        return [s[index] for s in self.steps]


class VLADecoderPruner(DecoderPruner):
    """The decoder mechanics of the LLaVA family plus the action-attention capture and the
    ``projected`` / ``text_attention(query="all")`` signals at ``llm`` points."""

    def __init__(self, decoder, runtime, points, capture):
        super().__init__(decoder, runtime, points, capture)
        layers = tuple(runtime.plan.capture.get("action", ()))
        if len(layers) > 1 or any(not 0 <= layer < len(decoder.layers) for layer in layers):
            raise ValueError(f"the action-attention layer must be one layer in [0, {len(decoder.layers) - 1}], got {layers}")
        self.action_layer = layers[0] if layers else None
        self._embeds: torch.Tensor | None = None  # the latest prefill's LM input (after its input transform)
        self._keys: dict = {}  # the action layer's keys and padding of the current step's sequence

    def install(self, installed) -> None:
        super().install(installed)
        if self.action_layer is not None:
            attn = self.decoder.layers[self.action_layer].self_attn
            installed.hook(attn.register_forward_hook(self._capture_action, with_kwargs=True))

    def end_generation(self) -> None:
        super().end_generation()
        self._keys = {}
        self.rt.finish_step()

    def _prefill_input(self, kwargs, record, cache):
        kwargs = super()._prefill_input(kwargs, record, cache)
        self._embeds = kwargs["inputs_embeds"]
        return kwargs

    # -- the action decoding's attention -------------------------------------------------------------
    def _capture_action(self, module, args, kwargs, output) -> None:
        st = self.state
        if st.layout is None:  # no image in this forward's prompt: not a control step
            return
        d = self.decoder
        hidden = read_arg(args, kwargs, "hidden_states", 0)
        cos, sin = read_arg(args, kwargs, "position_embeddings", 1)
        with torch.no_grad():
            k = d.split(module.k_proj(hidden), d.kv_heads)
            _, k = d.rope(k, k, cos, sin)
            q = d.split(module.q_proj(hidden[:, -1:]), d.heads)
            q, _ = d.rope(q, q, cos[..., -1:, :], sin[..., -1:, :])
            if st.prefill:  # the sequence as this layer sees it (after the points before it)
                self._keys = {"k": k, "real": st.mask2d.bool(), "layout": st.layout}
            else:
                real = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
                self._keys = {**self._keys, "k": torch.cat([self._keys["k"], k], 2), "real": torch.cat([self._keys["real"], real], 1)}
            probs = attention_rows(q, self._keys["k"], d.head_dim**-0.5, self._keys["real"][:, None])  # [B, H, 1, L]
            row = probs[:, :, 0].mean(1)
        layout = self._keys["layout"]
        rows = [int(r) for r in layout.row]
        if len(set(rows)) != len(rows) or len(rows) != row.shape[0]:
            raise RuntimeError(f"a VLA policy takes one image per prompt; this batch has {len(rows)} images in {row.shape[0]} prompts")
        vec = row.new_zeros(row.shape[0], max(layout.totals))
        for i, r in enumerate(rows):
            raster = layout.raster[i]
            grid = raster >= 0  # a CLS slot has no place on the grid
            vec[r, raster[grid]] = row[r, layout.positions[i][grid]]
        self.rt.action_row(vec)

    # -- signals at llm points -----------------------------------------------------------------------
    def _llm_signals(self, idx, group, pos, tokens, ahead, hidden) -> Signals:
        base = super()._llm_signals(idx, group, pos, tokens, ahead, hidden)
        st = self.state
        rows = st.layout.row[group]

        def projected():
            """The image tokens' LLM input embeddings ``[n_img, N, D]`` (followed back through the
            points before this one)."""
            out = []
            for j in range(len(group)):
                p, row = pos[j], int(rows[j])
                for _, t in sorted(st.layer_transforms.items(), reverse=True):
                    p = t.index[row, p]
                out.append(self._embeds[row, p])
            return torch.stack(out)

        def text_attention(layer: int = idx - 1, query: str = "last", **kwargs):
            if query != "all":
                return base.get("text_attention", layer=layer, query=query, **kwargs)
            if kwargs:
                raise ValueError(f"text_attention(query='all') takes only 'layer', got {sorted(kwargs)}")
            q, k, _ = base.get("llm_qkv", layer=layer)
            mask2d = st.captured[layer].get("mask2d", st.mask2d).bool()
            causal = torch.ones(mask2d.shape[1], mask2d.shape[1], dtype=torch.bool, device=q.device).tril()
            out = []
            for j in range(len(group)):
                row = int(rows[j])
                qpos = mask2d[row].nonzero().flatten()
                key_mask = (causal[qpos] & mask2d[row][None])[None]
                probs = attention_rows(q[row : row + 1, :, qpos], k[row : row + 1], self.decoder.head_dim**-0.5, key_mask)
                out.append(probs[0][:, :, pos[j]].mean(0).mean(0))
            return torch.stack(out)

        def action_history():
            """The episode's earlier steps, oldest first: ``[n_img, N]`` each on the raster grid."""
            return self.rt.history().select(rows, int(st.mask2d.shape[0]), "prompts", "a batch of episodes keeps its size")

        providers = {name: (lambda name=name, **kw: base.get(name, **kw)) for name in base.available()}
        return Signals({**providers, "projected": projected, "text_attention": text_attention, "action_history": action_history})


class VLARuntime(LlavaRuntime):
    decoder_class = VLADecoderPruner

    def history(self) -> ActionHistory:
        """This episode's :class:`ActionHistory` (made at its first use; ``handle.reset()`` drops it)."""
        return self.session.state.setdefault(HISTORY_KEY, ActionHistory())

    def action_row(self, vec: torch.Tensor) -> None:
        self.history().rows.append(vec)

    def finish_step(self) -> None:
        """Close the running control step (called when ``generate`` returns and when the next step begins)."""
        history = self.session.state.get(HISTORY_KEY)
        if history is not None:
            history.finish()

    def begin(self, n_visual, grid, device) -> None:
        self.finish_step()  # a step run by a plain forward ends when the next one starts
        super().begin(n_visual, grid, device)


@register_adapter
class VLAAdapter(LlavaAdapter):
    """:class:`vlmprune.vla.VLAPolicy` (family ``"vla"``): the LLaVA adapter on ``policy.llava``,
    with the episode as the session and the ``action_history`` signal (module docstring)."""

    model_types = ()

    def __init__(self, policy: VLAPolicy):
        super().__init__(policy.llava)
        self.policy = policy

    @classmethod
    def matches(cls, model) -> bool:
        return isinstance(model, VLAPolicy)

    def info(self):
        info = super().info()
        info.family = "vla"
        info.signals = SIGNALS
        return info

    def make_runtime(self, plan, info):
        return VLARuntime(plan, info, self)
