"""Pure tensor primitives shared by the methods: scorers, selectors and mergers, and the
checks of progressive schedules (:mod:`.schedule`).

Nothing here imports a model family. Every function works on batched tensors
(``[B, N]`` scores, ``[B, N, C]`` tokens) and returns indices or tensors of the
same batch size, so a method is mostly a composition of these.
"""

from .merging import bipartite_soft_matching, contextual_merge, recycle_by_cell, similarity_merge
from .schedule import check_ratios
from .scoring import (
    attention_rows,
    cls_attention,
    context_relevance,
    entropy,
    histogram_entropy,
    perturbation_sensitivity,
    received_attention,
    transition_variation,
    value_norm,
)
from .selection import (
    allocate_budget,
    chunk_groups,
    greedy_k_center,
    greedy_max_sum,
    max_min_diversity,
    pairwise_distance,
    rank_within_groups,
    stride_grid_mask,
    tile_groups,
    topk_keep_order,
    topk_per_group,
    union_keep,
    uniform_grid,
    weighted_max_min,
)

__all__ = [
    "allocate_budget",
    "attention_rows",
    "bipartite_soft_matching",
    "check_ratios",
    "chunk_groups",
    "cls_attention",
    "context_relevance",
    "contextual_merge",
    "entropy",
    "greedy_k_center",
    "greedy_max_sum",
    "histogram_entropy",
    "max_min_diversity",
    "pairwise_distance",
    "perturbation_sensitivity",
    "rank_within_groups",
    "received_attention",
    "recycle_by_cell",
    "similarity_merge",
    "stride_grid_mask",
    "tile_groups",
    "topk_keep_order",
    "topk_per_group",
    "transition_variation",
    "uniform_grid",
    "union_keep",
    "value_norm",
    "weighted_max_min",
]
