"""Random pruning: the floor every method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import Selection, TokenContext
from ..method import Method
from ..registry import register


@register
@dataclass
class RandomPrune(Method):
    """Keep ``budget`` visual tokens drawn uniformly at random before the LLM, in original order.

    The draw comes from one generator per forward seeded with ``seed`` (deterministic
    under a seed); a batch of images therefore draws differently from the same images
    one by one.
    """

    name = "random"
    stages = ("projector",)
    paper = {"title": "baseline: random visual-token selection", "arxiv": ""}

    def select(self, ctx: TokenContext) -> Selection:
        b, n = ctx.tokens.shape[:2]
        scores = torch.rand(b, n, generator=ctx.generator, device=ctx.generator.device).to(ctx.tokens.device)
        keep = torch.sort(scores.topk(ctx.budget, dim=-1).indices, dim=-1).values
        return Selection(keep=keep, scores=scores)
