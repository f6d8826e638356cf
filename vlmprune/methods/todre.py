"""ToDRE: a diverse subset of visual tokens before the LLM, task relevance inside it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import Point, Selection, TokenContext
from ..method import Method, option, scale_llm_layers
from ..primitives.selection import (
    greedy_k_center,
    greedy_max_sum,
    pairwise_distance,
    topk_keep_order,
)
from ..registry import register


def farthest_from_mean(x: torch.Tensor, metric: str) -> torch.Tensor:
    """``[B]`` index of the token farthest (in ``metric``) from the mean token of its image."""
    centre = x.float().mean(dim=1, keepdim=True)
    return pairwise_distance(torch.cat([centre, x.float()], dim=1), metric)[:, 0, 1:].argmax(dim=-1)


@register
@dataclass
class ToDRE(Method):
    """ToDRE (Li, Yang, (Zhang, Shao,) Lu, arXiv 2505.18757). **No official code was found**:
    this is a reconstruction from the v1/v2 abstracts and the standard algorithms they name;
    the details marked [unverified] are our best reading, each exposed as an option.

    **Stage 1, diversity (projector stage)**: keep ``budget`` tokens chosen greedily on the
    pairwise distances of the projected tokens (``features``): ``diversity="kcenter"`` (v1,
    greedy k-center: add the token farthest from the chosen set, Gonzalez's 2-approximation)
    or ``"maxsum"`` (v2, greedy max-sum diversification with no quality term: add the token
    with the largest sum of distances to the chosen set). Distance ``metric``: cosine
    [unverified; Euclidean is the textbook choice]. First token ``seed_token``
    [unverified]: the token farthest from the mean token (attention-free, default), the
    largest CLS attention at the feature layer (needs a CLS token), or token 0. Kept in raster
    order; positions are renumbered (``compact``), as for every pre-LLM method in LLaVA.

    **Stage 2, task relevance (LLM, before layer K2)**: the "information migration" stage.
    ``stage2="relevance"`` keeps the ``round(stage2_keep * n)`` of the ``n`` surviving tokens
    to which the last prompt token (``stage2_query``) pays the most head-mean attention at
    layer ``K2 - 1`` (recomputed from q and k, so SDPA stays on) [unverified: fraction, query
    rows, layer]; ``"drop_all"`` removes every visual token from K2 on (the abstracts' "all
    visual tokens in certain decoder layers"); ``"none"`` skips stage 2. Kept tokens keep their
    positions. A budget schedule entry for the ``llm`` point (``{"projector": 64, "llm": 16}``)
    overrides ``stage2_keep``.

    **Layers**: K2 is ``stage2_layer`` of a ``stage2_layer_of``-layer LLM (16 of 32 for
    LLaVA-1.5-7B, the card's suggestion [unverified]) scaled to the model's depth,
    ``K -> floor(K L / 32 + 0.5)`` (2 of 4).

    LLaVA-NeXT (the card asks to say which): stage 1 runs per crop on the adapter's
    proportional share of the image's budget (each crop's own k-center), stage 2 over the
    image's surviving tokens together.
    """

    name = "todre"
    stages = ("projector", "llm")
    needs = frozenset({"projected", "cls_attention", "text_attention"})
    paper = {
        "title": "ToDRE: Effective Visual Token Pruning via Token Diversity and Task Relevance "
        "(v1: ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large Vision-Language Models)",
        "arxiv": "2505.18757",
    }

    diversity: str = option("kcenter", "stage-1 greedy rule: v1's k-center or v2's max-sum", choices=("kcenter", "maxsum"))
    metric: str = option("cosine", "stage-1 distance [unverified]", choices=("cosine", "euclidean"))
    seed_token: str = option(
        "far_from_mean",
        "first stage-1 token [unverified]: farthest from the mean (card's default), most CLS-attended, or index 0",
        choices=("far_from_mean", "cls_attention", "first"),
    )
    features: str = option("projected", "stage-1 features: after the projector (card) or the vision features", choices=("projected", "vision"))
    stage2: str = option("relevance", "stage 2: top tokens by text attention, drop every visual token, or none", choices=("relevance", "drop_all", "none"))
    stage2_keep: float = option(0.5, "fraction of the stage-1 tokens kept by stage2='relevance' [unverified]")
    stage2_query: str = option("last", "stage-2 query rows: the last prompt token or the text after the image [unverified]", choices=("last", "instruction"))
    stage2_layer: int = option(16, "K2, the LLM layer stage 2 acts before [unverified; 16 of LLaVA-1.5-7B's 32]")
    stage2_layer_of: int = option(32, "depth stage2_layer refers to (LLaVA-1.5-7B: 32); 0: use it as given")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.stage2_keep <= 1.0:
            raise ValueError(f"option 'stage2_keep' of method 'todre' must be in [0, 1], got {self.stage2_keep}")
        self.needs = frozenset(  # what this instance reads, given its options
            ({"projected"} if self.features == "projected" else set())
            | ({"cls_attention"} if self.seed_token == "cls_attention" else set())
            | ({"text_attention"} if self.stage2 == "relevance" else set())
        )

    def layer(self, info) -> int:
        return scale_llm_layers((self.stage2_layer,), self.stage2_layer_of, info.llm_layers, "option 'stage2_layer' of method 'todre'")[0]

    def points(self, info):
        return [Point("projector")] + ([] if self.stage2 == "none" else [Point("llm", self.layer(info))])

    def capture_layers(self, info):
        enc = (info.feature_layer,) if self.seed_token == "cls_attention" else ()
        llm = (self.layer(info) - 1,) if self.stage2 == "relevance" else ()
        return {"encoder": enc, "llm": llm}

    def check(self, info) -> None:
        super().check(info)
        if self.seed_token == "cls_attention" and not info.has_cls:
            raise ValueError(
                f"option seed_token='cls_attention' of method 'todre' needs a CLS token, and this model's ({info.family}) "
                "vision tower has none; use seed_token='far_from_mean' or 'first'"
            )

    def select(self, ctx: TokenContext) -> Selection:
        return self.diverse(ctx) if ctx.stage == "projector" else self.relevant(ctx)

    def diverse(self, ctx: TokenContext) -> Selection:
        """Stage 1: ``budget`` diverse tokens, ascending."""
        x = ctx.signals.projected() if self.features == "projected" else ctx.tokens
        if self.seed_token == "far_from_mean":
            first = farthest_from_mean(x, self.metric)
        elif self.seed_token == "cls_attention":
            first = ctx.signals.cls_attention(layer=ctx.info.feature_layer).argmax(dim=-1)
        else:
            first = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        greedy = greedy_k_center if self.diversity == "kcenter" else greedy_max_sum
        return Selection(keep=greedy(x, ctx.budget, metric=self.metric, first=first))

    def relevant(self, ctx: TokenContext) -> Selection:
        """Stage 2: the tokens the text attends to most (or none)."""
        b, n = ctx.tokens.shape[:2]
        count = ctx.budget if ctx.budget < n else round(self.stage2_keep * n)
        if self.stage2 == "drop_all" or count == 0:
            return Selection(keep=torch.empty(b, 0, dtype=torch.long, device=ctx.tokens.device))
        scores = ctx.signals.text_attention(layer=ctx.layer - 1, query=self.stage2_query)
        return Selection(keep=topk_keep_order(scores, count), scores=scores)
