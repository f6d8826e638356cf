"""PruMerge+: adaptive CLS-attention outliers plus spatial samples, with key-similarity merging."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from ..context import Selection, TokenContext
from ..method import Method, option
from ..primitives.merging import similarity_merge
from ..registry import register


def iqr_outlier_ratio(scores: torch.Tensor) -> Fraction:
    """Share of ``scores`` above ``Q3 + 1.5 * IQR`` (PruMerge's adaptive ratio), as an exact
    fraction ``outliers / N``: the counts derived from it (``int(N r)``, ``int(1 / r)``) are then
    exact, where a float32 ratio loses a token (11 of 576: ``int(576 r) = 10``)."""
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device))
    return Fraction(int((scores > q3 + 1.5 * (q3 - q1)).sum()), scores.numel())


@register
@dataclass
class PruMergePlus(Method):
    """PruMerge+ (Shang et al., arXiv 2403.15388; code 42Shawn/LLaVA-PruMerge,
    ``token_prune_merge_advanced_plus``), training-free variant.

    CLS attention from the last encoder layer's q and k as one full-width head
    (``softmax(q k^T / sqrt(C))``). Adaptive count: the share of IQR outliers
    ``r`` keeps ``int(N r)`` top tokens (rank order), then the spatial samples
    ``0, int(s/3), 2 int(s/3), ... < N - 1`` with ``s = int(1/r)`` that are not yet kept
    (``sample_offset="0"``: the current code, May 2024, and the card; ``"step/6"``: from
    ``int(s/6)``, as the April 2024 version of the code). Counts are exact: ``r`` is the
    fraction ``outliers / N``, so ``int(N r)`` and ``int(1/r)`` are those of exact arithmetic
    (equal to the code's float64 ones for 576 tokens). Every kept token absorbs its 32 most
    key-similar other tokens weighted by their (unnormalised) CLS attention; one summary
    token ``sum_j a_j x_j`` over the dropped tokens is appended (``merge_map``: a dropped token
    absorbed by several centres is shown with the first of them in keep order; one absorbed by
    none is only in the summary, -1). The count adapts per image: the budget is only a cap
    (``adaptive=True``, the official behaviour); ``adaptive=False`` uses the budget's
    ratio ``(budget - 1) / N`` instead of the outlier share (a budget-matched variant,
    ours), which gives about ``budget`` tokens; a fraction budget becomes a count with
    ``int(N f)``, the code's ``int(N * reduction_ratio)``.

    Cap: at a budget below the method's own count, the list ``[top tokens (rank order),
    samples (raster order)]`` is cut to ``budget - 1``, so every top token stays and the
    samples that survive are the first ones in raster order: they come only from the top rows
    of the image (the official code has no budget and never cuts).
    """

    name = "prumerge_plus"
    stages = ("projector",)
    needs = frozenset({"encoder_qkv"})
    requires_cls = True
    fraction_rounding = "floor"  # the code's int(N * reduction_ratio)
    paper = {"title": "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models", "arxiv": "2403.15388"}

    adaptive: bool = option(True, "IQR-outlier ratio per image (official); False: ratio from the budget")
    merge_topk: int = option(32, "tokens each kept token absorbs (official: 32; 16 in the training variant)")
    sample_offset: str = option(
        "0", "first spatial sample: index 0 (current code, May 2024) or int(step/6) (April 2024 code)", choices=("0", "step/6")
    )

    def capture_layers(self, info):
        return {"encoder": (info.feature_layer + 1,), "llm": ()}

    def select(self, ctx: TokenContext) -> Selection:
        layer = ctx.info.feature_layer + 1
        q, k, _ = ctx.signals.encoder_qkv(layer=layer)
        b, h, t, d = q.shape
        q_full = q.transpose(1, 2).reshape(b, t, h * d)
        k_full = k.transpose(1, 2).reshape(b, t, h * d)
        attn = ((q_full[:, :1].float() @ k_full.float().transpose(1, 2)) * (h * d) ** -0.5).softmax(-1)
        cls_attn = attn[:, 0, 1:]  # [B, N]
        n = cls_attn.shape[1]
        keeps, merged, extras = [], [], []
        merge_map = torch.full((b, n), -1, dtype=torch.long, device=cls_attn.device)
        for i in range(b):
            ratio = iqr_outlier_ratio(cls_attn[i]) if self.adaptive else Fraction(ctx.budget - 1, n)
            count = max(1, int(n * ratio))
            top = cls_attn[i].topk(count).indices
            step = int(1 / max(ratio, Fraction(1, n)))
            start = step // 6 if self.sample_offset == "step/6" else 0
            samples = torch.arange(start, n - 1, max(1, step // 3), device=top.device)
            samples = samples[~torch.isin(samples, top)]
            keep = torch.cat([top, samples])[: max(1, ctx.budget - 1)]
            rest = torch.ones(n, dtype=torch.bool, device=keep.device)
            rest[keep] = False
            centres, absorbed = similarity_merge(ctx.tokens[i : i + 1], k_full[i : i + 1, 1:], keep[None], cls_attn[i : i + 1], self.merge_topk)
            by_centre = torch.zeros(keep.shape[0], n, dtype=torch.bool, device=keep.device)
            by_centre.scatter_(1, absorbed[0], True)
            first = by_centre.float().argmax(0)  # the first centre (keep order) absorbing each token
            merge_map[i] = torch.where(by_centre.any(0) & rest, first, -1)
            merge_map[i, keep] = torch.arange(keep.shape[0], device=keep.device)
            summary = (ctx.tokens[i][rest].float() * cls_attn[i][rest, None]).sum(0, keepdim=True)
            keeps.append(keep)
            merged.append(centres[0])
            extras.append(summary.to(ctx.tokens.dtype))
        return Selection(keep=keeps, merged=merged, extra=extras, scores=cls_attn, merge_map=merge_map)
