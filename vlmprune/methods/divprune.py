"""DivPrune: keep the most diverse subset of projected visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

from ..context import Selection, TokenContext
from ..method import Method
from ..primitives.selection import max_min_diversity
from ..registry import register


@register
@dataclass
class DivPrune(Method):
    """DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175).

    At the LLM input, greedy Max-Min Diversity on cosine distance between the
    *projected* visual tokens (``LAYER_INDEX=0`` in the official LLaVA fork): first the
    token whose nearest neighbour is farthest, then the token farthest from the chosen
    set, until ``budget``; kept in original order. No attention, no text.
    """

    name = "divprune"
    stages = ("projector",)
    needs = frozenset({"projected"})
    paper = {"title": "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", "arxiv": "2503.02175"}

    def select(self, ctx: TokenContext) -> Selection:
        return Selection(keep=max_min_diversity(ctx.signals.projected(), ctx.budget))
