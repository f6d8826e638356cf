"""VLA-Pruner: the union of the tokens the prefill finds important and the tokens earlier control
steps' action decoding attended to, thinned by max-min diversity when over budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..context import Point, Selection, TokenContext
from ..method import Method, option
from ..primitives.selection import max_min_diversity, topk_keep_order
from ..registry import register

ORDERS = ("code", "recent_first")


def temporal_guide(history: list[torch.Tensor], gamma: float, order: str = "code") -> torch.Tensor:
    """The temporal guide ``g`` ``[B, N]`` from the last ``w`` history vectors (oldest first, each
    ``[B, N]``), normalised to sum 1 per row (a zero row stays zero). ``order="code"``: the released
    code pairs ``gamma**(w-1), ..., gamma**0`` with the vectors from newest to oldest, so the
    *oldest* weighs most; ``"recent_first"``: the newest gets ``gamma**0`` (the paper's intent)."""
    if order not in ORDERS:
        raise ValueError(f"temporal_weight_order must be one of {list(ORDERS)}, got {order!r}")
    w = len(history)
    newest_first = history[::-1]
    weights = [gamma ** (w - 1 - i) if order == "code" else gamma**i for i in range(w)]
    g = sum(weight * vec.float() for weight, vec in zip(weights, newest_first))
    return g / g.sum(-1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)


def dual_level_select(guide: torch.Tensor, current: torch.Tensor, embeddings: Callable[[], torch.Tensor], k: int) -> torch.Tensor:
    """VLA-Pruner's selection, ``[B, k]`` ascending: the union of the top-``k`` of ``guide`` and of
    ``current`` (``[B, N]`` each); when it holds more than ``k`` tokens, DivPrune's greedy max-min
    diversity on the cosine distance of their ``embeddings()`` (``[B, N, C]``, asked for only then)
    keeps ``k``."""
    top_g, top_c = topk_keep_order(guide, k), topk_keep_order(current, k)
    out = []
    for row in range(guide.shape[0]):
        union = torch.unique(torch.cat([top_g[row], top_c[row]]))  # sorted
        if union.numel() > k:
            union = union[max_min_diversity(embeddings()[row, union][None], k)[0]]
        out.append(union)
    return torch.stack(out)


def _scaled(option: str, layer: int, depth: int, reference: int, low: int) -> int:
    """``layer`` of a ``reference``-deep LLM on one of ``depth`` layers, kept in ``[low, depth - 1]``
    (``reference`` 0: ``layer`` as given, refused outside that range)."""
    if not reference:
        if not low <= layer < depth:
            raise ValueError(f"option {option!r} of method 'vla_pruner' must be in [{low}, {depth - 1}] on this LLM, got {layer}")
        return layer
    return min(max(int(layer * depth / reference + 0.5), low), depth - 1)


@register
@dataclass
class VLAPruner(Method):
    """VLA-Pruner (Liu et al., arXiv 2511.16449; official code MINT-SJTU/VLA-Pruner, OpenVLA's
    ``predict_action`` and ``LlamaModel.fastv_forward``).

    Inside the LLM at prefill, before layer ``K``: ``k = round(N * keep)`` image tokens stay, the
    union of the top ``k`` by the prefill criterion at layer ``K - 1`` (default FastV's: the last
    prompt token's head-mean attention; ``use_prefill_attention``: the mean over every query row,
    the paper's) and the top ``k`` of the temporal guide (the last ``temporal_w`` steps' action
    attention, :func:`temporal_guide`), thinned to ``k`` by max-min diversity on the tokens' LLM
    input embeddings when larger (:func:`dual_level_select`). Kept tokens keep their original
    positions. While the episode has fewer than ``temporal_w`` earlier steps the step runs
    unpruned (the code's warm-up). ``use_temporal=False``: the prefill criterion's top ``k`` alone
    (the paper's "without temporal term"; FastV at ``K`` with the default criterion), which runs on
    any VLM. The temporal term needs a VLA policy (:class:`vlmprune.vla.VLAPolicy`), whose adapter
    keeps the history per episode (``handle.reset()``). Ties in top-k go to the lower index (the
    code's ``torch.topk`` leaves them unspecified).
    """

    name = "vla_pruner"
    stages = ("llm",)
    needs = frozenset({"text_attention", "projected", "action_history"})
    positions = "original"
    paper = {"title": "VLA-Pruner: Temporal-Aware Dual-Level Visual Token Pruning for Efficient Vision-Language-Action Inference",
             "arxiv": "2511.16449"}

    k_layer: int = option(3, "fastv_k: prune before LLM layer K, scored at K - 1 (GenerateConfig and scripts: 3 of OpenVLA's 32; scaled by layers_of, at least 1)")
    action_layer: int = option(15, "the layer whose action-token attention feeds the history (predict_action hard-codes 15 of 32; scaled by layers_of)")
    layers_of: int = option(32, "the LLM depth k_layer and action_layer refer to (OpenVLA's Llama-2-7B: 32); 0: the layers as given")
    use_temporal: bool = option(True, "use the temporal guide (scripts: on); False: the prefill criterion alone (the paper's ablation without the temporal term)")
    use_prefill_attention: bool = option(False, "criterion: False = the last prompt token's attention (FastV; the code's default scripts), True = mean over every query row (the paper; '_prefil' scripts)")
    temporal_w: int = option(3, "history window w (temporal_w / av_hist_w: 3); the first w steps of an episode run unpruned")
    temporal_gamma: float = option(0.8, "decay gamma (temporal_gamma / av_decay: 0.8)")
    temporal_weight_order: str = option(
        "code", "'code': the released code's weights, gamma**(w-1) on the newest vector and 1 on the oldest; "
        "'recent_first': the newest weighs 1 (the paper's intent, per the card)", ORDERS,
    )

    def __post_init__(self):
        super().__post_init__()
        if self.temporal_w < 1:
            raise ValueError(f"option 'temporal_w' of method 'vla_pruner' must be >= 1, got {self.temporal_w}")
        if not 0 < self.temporal_gamma <= 1:
            raise ValueError(f"option 'temporal_gamma' of method 'vla_pruner' must be in (0, 1], got {self.temporal_gamma}")
        if self.k_layer < 1 or self.action_layer < 0 or self.layers_of < 0:
            raise ValueError("options 'k_layer' (>= 1), 'action_layer' (>= 0) and 'layers_of' (>= 0) of method 'vla_pruner'")

    def layers(self, info) -> tuple[int, int]:
        """``(K, action layer)`` on this model's LLM."""
        depth = info.llm_layers
        if depth < 2:
            raise ValueError(f"method 'vla_pruner' prunes inside an LLM of at least 2 layers; this one has {depth}")
        return (_scaled("k_layer", self.k_layer, depth, self.layers_of, 1),
                _scaled("action_layer", self.action_layer, depth, self.layers_of, 0))

    def points(self, info):
        return [Point("llm", self.layers(info)[0])]

    def needs_for(self, info):
        return frozenset(self.needs) if self.use_temporal else frozenset({"text_attention"})

    def capture_layers(self, info):
        out = super().capture_layers(info)
        if self.use_temporal:
            out["action"] = (self.layers(info)[1],)
        return out

    def check(self, info) -> None:
        super().check(info)
        if self.use_temporal and "action_history" not in info.signals:
            raise ValueError(
                f"method 'vla_pruner' with use_temporal=True reads the action decoding's history of a VLA policy, which "
                f"this model ({info.family}) has none of: wrap a vlmprune.vla.VLAPolicy, or pass use_temporal=False"
            )

    def select(self, ctx: TokenContext) -> Selection:
        current = ctx.signals.text_attention(layer=ctx.layer - 1, query="all" if self.use_prefill_attention else "last")
        if not self.use_temporal:
            return Selection(keep=topk_keep_order(current, ctx.budget), scores=current)
        history = ctx.signals.action_history()
        b, n = current.shape
        if len(history) < self.temporal_w:  # warm-up: the step runs unpruned to fill the history
            return Selection(keep=torch.arange(n, device=current.device).expand(b, -1).clone(), scores=current)
        guide = temporal_guide(history[-self.temporal_w :], self.temporal_gamma, self.temporal_weight_order)
        index = ctx.token_index
        guide = guide.to(current.device).gather(1, index.clamp_min(0)).masked_fill(index < 0, 0)  # a CLS slot: no grid place
        keep = dual_level_select(guide, current, ctx.signals.projected, ctx.budget)
        return Selection(keep=keep, scores=current)
