"""FEATHER: FastV's criterion without RoPE, ensembled with a uniform grid, pruned in two stages."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import Point, Selection, TokenContext
from ..method import Method, option, scale_llm_layers
from ..primitives.selection import stride_grid_mask, topk_keep_order
from ..registry import register


@register
@dataclass
class Feather(Method):
    """FEATHER (Endo, Wang, Yeung-Levy, "Feather the Throttle", arXiv 2412.13180; code
    markendo/FEATHER, ``FastVLlamaModel`` with ``fastv_k=[8,16]``, ``fastv_ratio=0.7``,
    ``predefined_mask="no_rope_s=3"``).

    **Criterion**: before LLM layer ``K`` the image tokens are ranked by the attention the last
    prompt token pays them in layer ``K - 1``, recomputed from that layer's own q and k
    **without rotary embeddings** (``rope=False``; ``criterion="rope"`` is FastV's), softmax
    over the image keys only, mean over heads (the official ``calculate_attention_weight``).

    **Stage 1** (before ``layers[0]``): keep the top ``k1`` tokens by the criterion plus the
    uniform grid of every ``stride``-th row and column from (0, 0), ``sort(unique(T u U))``:
    between ``max(k1, |U|)`` and ``k1 + |U|`` tokens. **Stage 2** (before ``layers[1]``): the
    criterion again at ``layers[1] - 1`` over the survivors (grid tokens not protected), keep
    the top ``int(M1 * (r * r))`` of the ``M1`` survivors with ``r = 1 - ratio`` (``ratio`` the
    official ``fastv_ratio=0.7``; ``stage2_of="survivors"``, the official code; ``"original"``:
    of the original ``N``, the "exponentially increasing" ratio its comment describes).
    ``ratio=0`` derives ``r`` from the rounded budget instead, ``kappa = k1 / N`` (a
    budget-matched variant, ours; no budget then gives the paper's stage 2).

    **Budget**: ``k1``, the stage-1 criterion's count, i.e. FastV's budget (the official
    ``int(N * (1 - fastv_ratio))``); a fraction becomes a count with ``int(N f)`` as that code
    does, so ``budget=0.3`` with the default ``ratio=0.7`` is the paper's configuration (218 +
    up to 81 grid tokens of 729, then 9 % of them; 76 of 256). Fewer tokens survive stage 2
    than the budget (``handle.stats['points']`` reports both points). A schedule
    ``{"llm:K1": k1, "llm:K2": k2}`` sets stage 2's count directly. A budget of every token
    keeps every token at both stages.

    **Layers**: ``layers`` of a ``layers_of``-layer LLM (8, 16 of 32 for LLaMA-2-7B / Vicuna-7B),
    scaled with ``K -> floor(K L / 32 + 0.5)`` (1, 2 of 4). Kept tokens keep their original
    positions (as the official code).

    **Deviations**: batches of any size with padding (official: batch 1); the grid comes from
    the adapter's per-image grid (official: ``int(sqrt(N))``, square grids only).
    """

    name = "feather"
    stages = ("llm",)
    needs = frozenset({"text_attention"})
    positions = "original"
    fraction_rounding = "floor"  # the code's int(len * ratio)
    paper = {
        "title": "Feather the Throttle: Revisiting Visual Token Pruning for Vision-Language Model Acceleration",
        "arxiv": "2412.13180",
    }

    layers: tuple = option((8, 16), "the two pruning layers (official fastv_k=[8,16]: before decoder layers 8 and 16)")
    layers_of: int = option(32, "depth the layers refer to (Prismatic LLaMA-2-7B: 32); 0: use them as given")
    stride: int = option(3, "uniform grid stride at stage 1 (official predefined_mask='no_rope_s=3'); 0: no grid")
    criterion: str = option(
        "no_rope",
        "last-token attention without RoPE (FEATHER) or with it (FastV's criterion, official baseline)",
        choices=("no_rope", "rope"),
    )
    ratio: float = option(
        0.7, "official fastv_ratio: stage 2 keeps int(M * (1-ratio)^2), the paper's stage 1 is budget=1-ratio; 0: from the budget (ours)"
    )
    stage2_of: str = option(
        "survivors",
        "stage-2 count int(kappa^2 M): M = the survivors of stage 1 (official code) or the original count",
        choices=("survivors", "original"),
    )

    def __post_init__(self):
        super().__post_init__()
        if len(self.layers) != 2:
            raise ValueError(f"option 'layers' of method 'feather' must list two layers, got {self.layers!r}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"option 'ratio' of method 'feather' must be in [0, 1) (0: from the budget), got {self.ratio}")
        if self.stride < 0:
            raise ValueError(f"option 'stride' of method 'feather' must be >= 0 (0: no grid), got {self.stride}")

    def pruning_layers(self, info) -> tuple[int, int]:
        return scale_llm_layers(self.layers, self.layers_of, info.llm_layers, "option 'layers' of method 'feather'")

    def points(self, info):
        return [Point("llm", k) for k in self.pruning_layers(info)]

    def criterion_scores(self, ctx: TokenContext) -> torch.Tensor:
        """Head-mean attention of the last prompt token, softmax over the current image keys only."""
        probs = ctx.signals.text_attention(layer=ctx.layer - 1, query="last", rope=self.criterion == "rope", reduce="none")
        probs = probs / probs.sum(dim=-1, keepdim=True)  # renormalise over the image keys: [B, H, N]
        return probs.mean(dim=1)

    def select(self, ctx: TokenContext) -> Selection:
        b, n = ctx.tokens.shape[:2]
        first = ctx.layer == self.pruning_layers(ctx.info)[0]
        empty = torch.empty(b, 0, dtype=torch.long, device=ctx.tokens.device)
        if n == 0:
            return Selection(keep=empty)
        if first:
            for state in ctx.image_state:
                state[self.name] = {"kappa": ctx.budget / n, "n": n, "scheduled": ctx.budget != ctx.target, "all": ctx.budget >= n}
            count = ctx.budget
        else:
            s = ctx.image_state[0][self.name]
            of = n if self.stage2_of == "survivors" else s["n"]
            if s["scheduled"]:
                count = ctx.budget
            elif s["all"]:
                count = n
            elif self.ratio:
                r = 1 - self.ratio
                count = int(of * (r * r))  # the code's int(len(image_indices) * (r * r)), in float64
            else:
                count = int(s["kappa"] ** 2 * of)
        if count == 0:
            return Selection(keep=empty)
        scores = self.criterion_scores(ctx)
        if not first or self.stride == 0:
            return Selection(keep=topk_keep_order(scores, count), scores=scores)
        rows, cols = ctx.grid
        if int(ctx.token_index.max()) >= rows * cols:
            raise RuntimeError(f"method 'feather': raster indices exceed the adapter's grid {ctx.grid}")
        keep = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
        keep.scatter_(1, topk_keep_order(scores, count), True)
        keep |= stride_grid_mask(ctx.token_index, cols, self.stride)
        counts = keep.sum(dim=1)
        if bool((counts == counts[0]).all()):
            return Selection(keep=keep.nonzero()[:, 1].view(b, int(counts[0])), scores=scores)
        # the overlap of top-k and grid differs per image, and so does the count
        return Selection(keep=[row.nonzero().flatten() for row in keep], scores=scores)
