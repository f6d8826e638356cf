"""SparseVLM: text-guided visual token sparsification inside the LLM, with token recycling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import Point, Selection, TokenContext
from ..method import Method, option, scale_llm_layers
from ..registry import register

#: visual tokens kept after each sparsification layer, per budget (``score.py``'s
#: ``sparse_token_list_*``, LLaVA-1.5-7B's 576 tokens): the code's default (v1.5) and its
#: ``USE_VERSION=2_0`` lists
COUNTS = {
    "1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "2.0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
#: v1.0 (October 2024 release): ``(scale, bias)`` of the rank rule per budget (its README and
#: ``scripts/v1_5/eval``: MME 192 tokens 13.5/0, POPE 128 tokens 9/6, TextVQA 64 tokens 0.8/0)
RANK_RULE = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
#: pruning points, before these 0-based layers of a 32-layer LLM: the code prunes the output of
#: layers ``pruning_loc`` = 2, 6, 15 (v1.0: 2, 6, 15, 19) with that layer's own attention
LAYERS = {"1.5": (3, 7, 16), "2.0": (3, 7, 16), "1.0": (3, 7, 16, 20)}
REFERENCE_TOKENS = 576
#: v2.0's priority heads: the top 14 of LLaVA-1.5-7B's 32 by rater -> image attention
PRIORITY_HEADS = (14, 32)


def select_raters(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices of the text raters: ``softmax_text(H_v H_t^T)`` averaged over the visual tokens
    gives each text token's relevance; raters are those strictly above the mean relevance (the
    code's ``m_v_t > m_v_t.mean()``)."""
    relevance = (image.float() @ text.float().T).softmax(-1).mean(0)
    return (relevance > relevance.mean()).nonzero().flatten()


def density_peak_merge(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering of ``x`` ``[M, C]`` into ``clusters`` groups, each merged by its mean
    (the code's ``cluster_and_merge``, from TCFormer). Distances ``||x_i - x_j|| / sqrt(C)``;
    density ``exp(-mean of the squared distances to the k = clusters nearest, self included)``;
    ``delta`` = distance to the nearest denser token (the densest: the largest distance); the
    ``clusters`` tokens with the largest ``delta * density`` are the centres and every token
    joins its nearest centre. Returns ``(centres [K], assignment [M], means [K, C])``; a
    cluster's mean divides by its size + 1e-6 as the code does. Ties in density go to the lower
    index (the code breaks them with uniform noise of 1e-6)."""
    m, c = x.shape
    x = x.float()
    dist = torch.cdist(x[None], x[None])[0] / c**0.5
    nearest = dist.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    index = torch.arange(m, device=x.device)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (index[None, :] < index[:, None]))
    delta = torch.where(denser, dist, dist.max()).min(-1).values
    centres = (delta * density).topk(clusters).indices
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(clusters, device=x.device)
    sums = x.new_zeros(clusters, c).index_add_(0, assign, x)
    sizes = x.new_zeros(clusters).index_add_(0, assign, x.new_ones(m))
    return centres, assign, sums / (sizes[:, None] + 1e-6)


@register
@dataclass
class SparseVLM(Method):
    """SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417; code Gumpest/SparseVLMs, main =
    the v1.5 code with SparseVLM+'s "v2.0" mode behind ``USE_VERSION=2_0``; LLaVA files
    ``modelling_sparse_llama.py``, ``score.py``, ``utils.py``).

    **Raters** (once, at the LLM input): each text token after the image gets the mean over
    the image tokens of ``softmax_text(H_v H_t^T)``; tokens strictly above the mean are the
    raters (:func:`select_raters`). **Sparsification** at each point before layer ``K``: the
    head-averaged attention the raters pay each current image token in layer ``K - 1`` (the code
    prunes that layer's output with its own attention), averaged over the raters, ranks the
    image tokens; the top ``count`` stay in order. **Recycling**: of the deleted tokens the
    ``int(0.3 d) + 1`` best-scored are clustered into ``int(m / 10) + 1`` groups
    (:func:`density_peak_merge`) and each group's mean comes back as one image token; the rest
    are gone. Recycled tokens take part in the later points like the others.

    **Versions** (``version``): ``"1.5"`` (default, the repository's current code): points
    before layers 3, 7, 16 of 32, the ``count`` of each point from the code's per-budget lists
    (:data:`COUNTS`; 192 tokens: 300, 200, 110), positions renumbered without gaps after each
    point (the code slices ``position_ids``; at decode each layer numbers the new token by its
    own cache length). ``"1.0"`` (the October 2024 release; the card's adaptive count): points
    before 3, 7, 16, 20, and ``count = min(int(rank * scale + bias), n - 1)`` from the rank of
    the rater x image attention matrix (nothing pruned when the rank is ``n``), ``scale, bias``
    per budget (:data:`RANK_RULE`; the paper writes it as deleting ``lambda (n - rank)``).
    ``"2.0"`` (SparseVLM+, the code's ``USE_VERSION=2_0``): the v2.0 lists, each attention
    probability divided by the scaled RoPE-only logit of all-ones queries and keys at its two
    positions ("attention gravity" correction), the mean over the ``14 H / 32`` heads (14 of 32)
    with the largest rater -> image attention sum instead of all heads, no recycling, and kept
    tokens keep their position ids.

    **Budget**: the code's ``RETAIN_TOKN``, which names a list of counts whose visual tokens per
    layer, averaged over LLaVA-1.5-7B's 32 layers, come to about the budget (its "Equal
    Tokens"), not the count left at the end: at 192 of 576 tokens the last layers see 110 plus
    the recycled ones. Other budgets and token counts (ours): the lists of the official budget
    nearest ``budget * 576 / N`` scaled by ``budget / official budget`` (exactly the official
    lists at 576 tokens); the layer average is not re-solved, so on a shallow LLM, whose first
    point comes after a larger share of its layers, it lies above the budget (the embedded
    4-layer LLM: 134 tokens at 85). Version 1.0 picks ``scale, bias`` the same way. A per-point
    schedule ``{"llm:K": count}`` sets the counts; a budget of every token prunes nothing. As
    the code, a count never exceeds ``n - 1``.

    **Deviations**: per image of a batch (the code: batch 1); raters among the row's real text
    tokens after the image (the code takes every position after it, padding included); scores in
    float32; density ties broken by index instead of the code's random noise; a recycled token
    sits in the place of its cluster's centre (one of the deleted tokens) instead of after the
    kept image tokens, so with renumbered positions it takes that place's number; a prompt with
    no text after the image uses its last text token as the rater. Layers scale to other depths
    as ``K -> floor(K L / 32 + 0.5)``, collisions spread (1, 2, 3 of 4).
    """

    name = "sparsevlm"
    stages = ("llm",)
    needs = frozenset({"hidden", "text_attention", "llm_input"})
    positions = "original"
    llm_positions = "compact"
    paper = {"title": "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference",
             "arxiv": "2410.04417"}

    version: str = option("1.5", "code version: the repository's current code (v1.5), its USE_VERSION=2_0 mode "
                                 "(v2.0, SparseVLM+), or the October 2024 rank rule (v1.0)", choices=("1.5", "2.0", "1.0"))
    layers: tuple = option((), "pruning points, before these 0-based layers; (): the version's (v1.5: 3, 7, 16; "
                               "v1.0: 3, 7, 16, 20 = after the code's pruning_loc)")
    layers_of: int = option(32, "depth the layers refer to (LLaVA-1.5-7B: 32); 0: use them as given")
    recycle: bool = option(True, "recycle deleted tokens into cluster means (code v1.0, v1.5); False: delete them "
                                 "(version '2.0' always does, as its code cancels the merge)")
    scale: float = option(-1.0, "v1.0: scale of the rank rule; -1: the official value for the budget (13.5 / 9 / 0.8)")
    bias: float = option(-1.0, "v1.0: bias of the rank rule; -1: the official value for the budget (0 / 6 / 0)")

    def __post_init__(self):
        super().__post_init__()
        if self.version != "1.0" and (self.scale != -1.0 or self.bias != -1.0):
            raise ValueError("options 'scale' and 'bias' of method 'sparsevlm' apply to version '1.0' only")
        if self.scale != -1.0 and self.scale < 0:
            raise ValueError(f"option 'scale' of method 'sparsevlm' must be >= 0 (or -1: official), got {self.scale}")
        if self.version == "2.0":  # the code's v2.0 mode: no merge, position ids kept
            self.recycle = False
            self.llm_positions = "original"

    def pruning_layers(self, info) -> tuple[int, ...]:
        layers = self.layers or LAYERS[self.version]
        return scale_llm_layers(layers, self.layers_of if self.layers else 32, info.llm_layers,
                                "option 'layers' of method 'sparsevlm'", spread=True)

    def points(self, info):
        return [Point("llm", k) for k in self.pruning_layers(info)]

    @staticmethod
    def _official(budget: int, n0: int, table) -> int:
        """The official budget whose share of 576 tokens is nearest ``budget / n0`` (ties: smaller)."""
        return min(sorted(table), key=lambda b: abs(b - budget * REFERENCE_TOKENS / n0))

    def count(self, ctx: TokenContext, t: int, n0: int, attention: torch.Tensor, budget: int | None = None) -> int:
        """Image tokens the point keeps (before recycling) for one image whose budget was
        ``budget`` at the first point (default ``ctx.budget``; later points see it capped at the
        current count)."""
        n = attention.shape[-1]
        if ctx.budget != ctx.target:  # a per-point schedule
            return min(ctx.budget, n)
        budget = ctx.budget if budget is None else budget
        if budget >= n0:
            return n
        if self.version == "1.0":
            rank = int(torch.linalg.matrix_rank(attention.float()))
            if rank == n:
                return n
            b0 = self._official(budget, n0, RANK_RULE)
            scale = self.scale if self.scale != -1.0 else RANK_RULE[b0][0]
            bias = self.bias if self.bias != -1.0 else RANK_RULE[b0][1]
            return max(0, min(int(rank * scale + bias), n - 1))
        b0 = self._official(budget, n0, COUNTS[self.version])
        return max(0, min(round(COUNTS[self.version][b0][t] * budget / b0), n - 1))

    def select(self, ctx: TokenContext) -> Selection:
        t = self.pruning_layers(ctx.info).index(ctx.layer)
        states = ctx.state.images
        if t == 0:
            for state, (image, text) in zip(states, ctx.signals.llm_input()):
                raters = select_raters(image, text) if text.shape[0] else torch.zeros(1, dtype=torch.long)
                state["raters"] = (text.shape[0] - 1 - raters).clamp(min=0)  # counted back from the last text token
                state["n0"], state["budget"] = image.shape[0], ctx.budget
        v2 = self.version == "2.0"
        rows = ctx.signals.text_attention(layer=ctx.layer - 1, query=tuple(s["raters"] for s in states), per_query=True,
                                          **({"reduce": "none", "divide_rope": True} if v2 else {}))
        keeps, merged, recycled_any = [], [], False
        for j, attention in enumerate(rows):  # [raters, N], head mean (v2.0: [H, raters, N])
            if v2:
                heads = max(1, round(attention.shape[0] * PRIORITY_HEADS[0] / PRIORITY_HEADS[1]))
                attention = attention[attention.sum((1, 2)).topk(heads).indices].mean(0)
            tokens = ctx.tokens[j]
            n = tokens.shape[0]
            scores = attention.float().mean(0)
            count = self.count(ctx, t, states[j]["n0"], attention, states[j]["budget"])
            kept = scores.topk(count).indices.sort().values
            values = tokens[kept]
            deleted = torch.ones(n, dtype=torch.bool, device=tokens.device)
            deleted[kept] = False
            deleted = deleted.nonzero().flatten()
            if deleted.numel() and self.recycle:
                recycled = deleted[scores[deleted].topk(int(deleted.numel() * 0.3) + 1).indices]
                centres, _, means = density_peak_merge(tokens[recycled], int(recycled.numel() / 10) + 1)
                kept = torch.cat([kept, recycled[centres]])
                values = torch.cat([values, means.to(tokens.dtype)])
                order = kept.argsort()
                kept, values = kept[order], values[order]
                recycled_any = True
            keeps.append(kept)
            merged.append(values)
        return Selection(keep=keeps, merged=merged if recycled_any else None)
