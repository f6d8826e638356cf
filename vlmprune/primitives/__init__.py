"""Pure tensor primitives shared by the methods: scorers, selectors and mergers.

Nothing here imports a model family. Every function works on batched tensors
(``[B, N]`` scores, ``[B, N, C]`` tokens) and returns indices or tensors of the
same batch size, so a method is mostly a composition of these.
"""

from .merging import bipartite_soft_matching, contextual_merge, similarity_merge
from .scoring import attention_rows, cls_attention, entropy, value_norm
from .selection import (
    allocate_budget,
    greedy_k_center,
    max_min_diversity,
    topk_keep_order,
    union_keep,
    uniform_grid,
)

__all__ = [
    "allocate_budget",
    "attention_rows",
    "bipartite_soft_matching",
    "cls_attention",
    "contextual_merge",
    "entropy",
    "greedy_k_center",
    "max_min_diversity",
    "similarity_merge",
    "topk_keep_order",
    "union_keep",
    "uniform_grid",
    "value_norm",
]
