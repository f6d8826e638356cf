"""Keep a fixed index set: the reference for manual-equivalence and cache tests, and a way to
replay a selection recorded from another method."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import Point, Selection, TokenContext
from ..method import Method, option
from ..registry import register


@register
@dataclass
class Fixed(Method):
    """Keep the visual tokens whose raster indices are listed in ``indices`` at ``stage``
    (``"projector"``, ``"llm"`` before decoder layer ``layer``, or ``"encoder"`` before
    vision-encoder block ``layer``, where the adapter offers it). ``indices`` is one list for
    every image, or a list of lists, one per image of the batch."""

    name = "fixed"
    stages = ("encoder", "projector", "llm")
    paper = {"title": "utility: a fixed index set", "arxiv": ""}

    indices: tuple = option((), "raster indices of the tokens to keep")
    stage: str = option("projector", "where the tokens leave", choices=("encoder", "projector", "llm"))
    layer: int = option(2, "LLM layer when stage='llm', vision-encoder block when stage='encoder'")

    def __post_init__(self):
        super().__post_init__()
        if not self.indices:
            raise ValueError("option 'indices' of method 'fixed' must list at least one token index")
        per_image = isinstance(self.indices[0], (tuple, list))
        rows = [tuple(int(i) for i in r) for r in self.indices] if per_image else [tuple(int(i) for i in self.indices)]
        if any(len(set(r)) != len(r) for r in rows) or len({len(r) for r in rows}) != 1:
            raise ValueError("option 'indices' of method 'fixed' has duplicates or rows of different lengths")
        self.indices = tuple(rows) if per_image else rows[0]
        self.stages = (self.stage,)  # this instance acts at one stage only (checked against the adapter)

    @property
    def positions(self):  # type: ignore[override]
        return "original" if self.stage == "llm" else "compact"

    def points(self, info):
        return [Point(self.stage, self.layer)] if self.stage in ("llm", "encoder") else [Point("projector")]

    def select(self, ctx: TokenContext) -> Selection:
        wanted = torch.tensor(self.indices, device=ctx.tokens.device)
        wanted = wanted.view(-1, wanted.shape[-1])
        if wanted.shape[0] > 1 and ctx.images and max(ctx.images) < wanted.shape[0]:
            wanted = wanted[list(ctx.images)]  # one row per image of the forward: this call's images
        if wanted.shape[0] == 1:
            wanted = wanted.expand(ctx.tokens.shape[0], -1)
        if wanted.shape[0] != ctx.tokens.shape[0]:
            raise ValueError(f"fixed: {wanted.shape[0]} index rows for {ctx.tokens.shape[0]} images")
        hit = ctx.token_index.unsqueeze(-1) == wanted.unsqueeze(1)  # [B, N, K]
        if not bool(hit.any(1).all()):
            raise ValueError(f"fixed: some indices are not among the {ctx.n} tokens alive at {ctx.point}")
        keep = torch.sort(hit.float().argmax(1), dim=-1).values
        return Selection(keep=keep)
