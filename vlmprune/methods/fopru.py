"""FoPru: focal pruning from vision-encoder attention, by global rank or along image rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import Selection, TokenContext
from ..method import Method, option
from ..primitives.scoring import received_attention
from ..primitives.selection import topk_keep_order, topk_per_group
from ..registry import register


def row_quota(row_scores: torch.Tensor, row_sizes: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """Tokens to keep in each image row, ``[B, H]`` summing to ``k``.

    ``"whole_rows"``: rows in descending ``row_scores`` order are kept whole until ``k`` is
    reached; the row where it is reached contributes only the rest. ``"per_row_topk"``:
    every row ``k // H``, the ``k % H`` rows with the largest scores one more."""
    b, h = row_scores.shape
    order = torch.sort(row_scores, dim=-1, descending=True, stable=True).indices
    sizes = row_sizes.to(row_scores.device).long().expand(b, h)
    if mode == "whole_rows":
        ordered = sizes.gather(1, order)
        before = ordered.cumsum(-1) - ordered
        quota_sorted = (k - before).clamp(min=0).minimum(ordered)
    else:
        quota_sorted = torch.full((b, h), k // h, dtype=torch.long, device=row_scores.device)
        quota_sorted[:, : k % h] += 1
    return torch.empty_like(quota_sorted).scatter_(1, order, quota_sorted)


@register
@dataclass
class FoPru(Method):
    """FoPru (Jiang et al., arXiv 2411.14164). **Reconstructed**: no official code was found
    and only the abstract was read, so every choice below beyond "significance from the
    vision encoder's self-attention, rank or row strategy, kept tokens reordered to their
    original positions" is our best reading [unverified]; re-check against the paper's
    Section 3 before claiming fidelity.

    Before the projector: the significance of each patch is the attention it *receives* in
    one vision-encoder layer, ``sigma_j = sum_i mean_heads(A)[i, j]`` over every query row
    (CLS row included; CLS column dropped) [R]; ``significance="cls"`` uses the CLS row only.
    Then ``strategy="rank"`` keeps the global top ``budget``, ``strategy="row"`` selects
    along image rows (``row_mode``), and the kept tokens go to the LLM in raster order.

    Parameters
    ----------
    strategy : {"rank", "row"}, default "rank"
        The two strategies of the abstract: global top-k ("global view") or row-wise
        ("preserving continuous key information ... local perspective").
    row_mode : {"whole_rows", "per_row_topk"}, default "whole_rows"
        [R] ``"whole_rows"``: keep the best rows (by summed significance) whole, and the best
        tokens of the next row for the remainder; ``"per_row_topk"``: every row gets
        ``budget // rows`` (the remainder to the best rows) and keeps its top tokens.
    significance : {"received", "cls"}, default "received"
        [R] attention received from all rows, or the CLS row (needs a CLS token).
    layer : int, default 0
        1-indexed vision layer of the attention; 0: the feature layer (LLaVA's
        ``hidden_states[-2]``, i.e. layer 23 of CLIP-L) [R].

    LLaVA-NeXT: per crop, each crop's own significance and the adapter's proportional share of
    the image's budget (the card's default reading; the abstract does not say).
    """

    name = "fopru"
    stages = ("projector",)
    needs = frozenset({"encoder_attention", "cls_attention"})
    paper = {"title": "FoPru: Focal Pruning for Efficient Large Vision-Language Models", "arxiv": "2411.14164"}

    strategy: str = option("rank", "rank (global top-k) or row (along image rows); both from the abstract", choices=("rank", "row"))
    row_mode: str = option(
        "whole_rows", "[reconstructed] row strategy: best whole rows, or a top-k quota in every row",
        choices=("whole_rows", "per_row_topk"),
    )
    significance: str = option(
        "received", "[reconstructed] attention received from all query rows, or the CLS row", choices=("received", "cls")
    )
    layer: int = option(0, "[reconstructed] 1-indexed vision layer; 0 = the feature layer LLaVA uses")

    def __post_init__(self):
        super().__post_init__()
        if self.layer < 0:
            raise ValueError(f"option 'layer' of method 'fopru' must be >= 0 (0 = feature layer), got {self.layer}")

    def vision_layer(self, info) -> int:
        if self.layer == 0:
            return info.feature_layer
        if self.layer > info.encoder_layers:
            raise ValueError(f"option 'layer' of method 'fopru' must be in [0, {info.encoder_layers}], got {self.layer}")
        return self.layer - 1

    def needs_for(self, info):
        return frozenset({"cls_attention" if self.significance == "cls" else "encoder_attention"})

    def check(self, info):
        if self.significance == "cls" and not info.has_cls:
            raise ValueError(
                f"method 'fopru' with significance='cls' needs a CLS token, and this model's ({info.family}) vision "
                "tower has none; use significance='received'"
            )
        super().check(info)
        self.vision_layer(info)

    def capture_layers(self, info):
        return {"encoder": (self.vision_layer(info),), "llm": ()}

    def select(self, ctx: TokenContext) -> Selection:
        layer = self.vision_layer(ctx.info)
        if self.significance == "cls":
            sigma = ctx.signals.cls_attention(layer=layer, reduce="mean")
        else:
            sigma = received_attention(ctx.signals.encoder_attention(layer=layer), ctx.info.has_cls, reduce="sum")
        if self.strategy == "rank":
            return Selection(keep=topk_keep_order(sigma, ctx.budget), scores=sigma)
        b = sigma.shape[0]
        cols = ctx.grid[1]
        row = ctx.token_index // cols  # [B, N] image row of every token
        rows = ctx.grid[0]
        row_scores = torch.zeros(b, rows, device=sigma.device).scatter_add_(1, row, sigma)
        row_sizes = torch.zeros(b, rows, dtype=torch.long, device=sigma.device).scatter_add_(1, row, torch.ones_like(row))
        if self.row_mode == "per_row_topk" and bool((row_sizes != cols).any()):
            raise RuntimeError("fopru: row_mode='per_row_topk' needs the full token grid at the projector")
        quota = row_quota(row_scores, row_sizes, ctx.budget, self.row_mode)
        mask = topk_per_group(sigma, row, quota)
        keep = mask.nonzero()[:, 1].view(b, ctx.budget)
        return Selection(keep=keep, scores=sigma)
