"""Uniform grid sampling: spatial coverage with no scoring at all."""

from __future__ import annotations

from dataclasses import dataclass


from ..context import Selection, TokenContext
from ..method import Method
from ..primitives.selection import uniform_grid
from ..registry import register


@register
@dataclass
class UniformGrid(Method):
    """Keep ``budget`` tokens on an even 2-D lattice over the patch grid, in raster order.

    The yardstick for "does scoring beat plain coverage"; the same lattice is FEATHER's
    and PruMerge+'s spatial branch.
    """

    name = "uniform"
    stages = ("projector",)
    paper = {"title": "baseline: uniform spatial sampling", "arxiv": ""}

    def select(self, ctx: TokenContext) -> Selection:
        rows, cols = ctx.grid
        wanted = uniform_grid(rows, cols, ctx.budget, device=ctx.tokens.device)
        hit = (ctx.token_index.unsqueeze(-1) == wanted).any(-1)  # [B, N]
        if not bool((hit.sum(-1) == ctx.budget).all()):
            raise RuntimeError("uniform grid needs the full token grid; an earlier point removed lattice tokens")
        keep = hit.nonzero()[:, 1].view(ctx.tokens.shape[0], ctx.budget)
        return Selection(keep=keep, scores=hit.float())
