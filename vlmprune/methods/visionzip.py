"""VisionZip: dominant tokens by CLS attention plus contextual tokens merged from the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import Selection, TokenContext
from ..method import Method, option
from ..primitives.merging import contextual_merge
from ..primitives.selection import topk_keep_order
from ..registry import register


@register
@dataclass
class VisionZip(Method):
    """VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467), text-agnostic, before the LLM.

    Dominant: the CLS token plus the ``D - 1`` patches with the most CLS attention
    (summed over heads) at the feature layer (CLIP layer -2). Contextual: the remaining
    tokens join their most key-similar of ``Cn`` uniformly strided targets (head-mean
    keys of the feature layer); each contextual token is ``target + mean(joined)``.
    Output order as the official code: ``[CLS, dominant (original order), contextual
    (target order)]``; the CLS token counts towards the budget (``dominant=54,
    contextual=10`` makes 64).

    Parameters
    ----------
    contextual_ratio : float, default 10/64
        ``Cn = round(budget * ratio)`` when ``contextual`` is 0: 64 -> 54 + 10 (official
        README), 128 -> 108 + 20, 192 -> 162 + 30 (the proportional splits of reproductions).
    contextual : int, default 0
        Fixed ``Cn``; 0 derives it from ``contextual_ratio``.
    """

    name = "visionzip"
    stages = ("projector",)
    needs = frozenset({"cls_attention", "encoder_qkv"})
    requires_cls = True
    paper = {"title": "VisionZip: Longer is Better but Not Necessary in Vision Language Models", "arxiv": "2412.04467"}

    contextual_ratio: float = option(10 / 64, "share of the budget given to contextual tokens (54+10 of 64, README)")
    contextual: int = option(0, "fixed number of contextual tokens; 0 derives it from contextual_ratio")

    def split(self, budget: int) -> tuple[int, int]:
        """(dominant patches, contextual tokens) for ``budget`` (the CLS token is the +1)."""
        cn = self.contextual or round(budget * self.contextual_ratio)
        cn = max(1, min(cn, budget - 2)) if budget >= 3 else 0
        return budget - cn - 1, cn

    def select(self, ctx: TokenContext) -> Selection:
        layer = ctx.info.feature_layer
        scores = ctx.signals.cls_attention(layer=layer, reduce="sum")
        n_dom, n_ctx = self.split(ctx.budget)
        n_dom = max(n_dom, 1)
        dominant = topk_keep_order(scores, n_dom)
        if n_ctx == 0:
            return Selection(keep=dominant, scores=scores, keep_cls=ctx.budget > n_dom)
        b, n = scores.shape
        rest_mask = torch.ones(b, n, dtype=torch.bool, device=scores.device)
        rest_mask.scatter_(1, dominant, False)
        remaining = rest_mask.nonzero()[:, 1].view(b, n - n_dom)
        keys = ctx.signals.encoder_qkv(layer=layer)[1].mean(1)[:, 1:]  # head-mean keys, CLS dropped
        targets, values, owner = contextual_merge(ctx.tokens, keys, remaining, n_ctx)
        keep = torch.cat([dominant, targets], dim=1)
        dom_values = ctx.tokens.gather(1, dominant.unsqueeze(-1).expand(-1, -1, ctx.tokens.shape[-1]))
        merge_map = torch.where(owner >= 0, owner + n_dom, owner)
        merge_map.scatter_(1, dominant, torch.arange(n_dom, device=scores.device).expand(b, -1).contiguous())
        return Selection(keep=keep, merged=torch.cat([dom_values, values], dim=1), keep_cls=True, scores=scores,
                         merge_map=merge_map)
