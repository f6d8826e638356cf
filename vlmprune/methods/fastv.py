"""FastV: drop the image tokens the last prompt token ignores, after LLM layer K."""

from __future__ import annotations

from dataclasses import dataclass

from ..context import Point, Selection, TokenContext
from ..method import Method, option
from ..primitives.selection import topk_keep_order
from ..registry import register


@register
@dataclass
class FastV(Method):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764).

    Layers ``0..K-1`` see every token. Before layer ``K`` the image tokens are ranked by
    the head-averaged attention the last prompt token pays them in layer ``K-1``
    (recomputed from that layer's q and k after RoPE, so SDPA stays on) and the top
    ``budget`` are kept in order; kept tokens keep their original position ids
    (``fast_v_inplace=True``, the official code's physical drop).

    Parameters
    ----------
    k_layer : int, default 2
        ``fast_v_agg_layer``: the paper's and official code's K = 2.
    """

    name = "fastv"
    stages = ("llm",)
    needs = frozenset({"text_attention"})
    positions = "original"
    paper = {"title": "An Image is Worth 1/2 Tokens After Layer 2", "arxiv": "2403.06764"}

    k_layer: int = option(2, "fast_v_agg_layer K (paper and official code: 2)")

    def points(self, info):
        if not 1 <= self.k_layer < info.llm_layers:
            raise ValueError(f"option 'k_layer' of method 'fastv' must be in [1, {info.llm_layers - 1}], got {self.k_layer}")
        return [Point("llm", self.k_layer)]

    def select(self, ctx: TokenContext) -> Selection:
        scores = ctx.signals.text_attention(layer=self.k_layer - 1, query="last")
        return Selection(keep=topk_keep_order(scores, ctx.budget), scores=scores)
