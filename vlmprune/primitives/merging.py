"""Mergers: fold the information of dropped tokens into kept ones."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def contextual_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    remaining: torch.Tensor,
    n_contextual: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens (arXiv 2412.04467, code-exact).

    ``remaining`` ([B, R]) are the tokens not kept as dominant, in sequence order.
    Targets are every ``max(1, R // n_contextual)``-th of them (the first
    ``n_contextual``); every other remaining token joins its most similar target
    (dot product of L2-normalised ``metric``); a contextual token is
    ``x_target + mean(x of the joined tokens)``.
    Returns ``(targets [B, Cn] indices into x, values [B, Cn, C], owner [B, N])``: ``owner``
    is the position in ``targets`` of the contextual token each remaining token went into
    (-1 for tokens not in ``remaining``).
    """
    b, r = remaining.shape
    step = max(1, r // n_contextual)
    target_pos = torch.arange(0, r, step, device=x.device)[:n_contextual]
    is_target = torch.zeros(r, dtype=torch.bool, device=x.device)
    is_target[target_pos] = True
    targets = remaining[:, target_pos]
    others = remaining[:, ~is_target]
    m = F.normalize(metric.float(), dim=-1)
    sim = _gather(m, others) @ _gather(m, targets).transpose(-1, -2)
    assign = sim.argmax(dim=-1)
    xo = _gather(x, others).float()
    summed = torch.zeros(b, targets.shape[1], x.shape[-1], device=x.device).scatter_add_(
        1, assign.unsqueeze(-1).expand_as(xo), xo
    )
    counts = torch.zeros(b, targets.shape[1], device=x.device).scatter_add_(
        1, assign, torch.ones_like(assign, dtype=torch.float)
    )
    values = _gather(x, targets).float() + summed / counts.clamp_min(1).unsqueeze(-1)
    owner = torch.full(x.shape[:2], -1, dtype=torch.long, device=x.device)
    owner.scatter_(1, targets, torch.arange(targets.shape[1], device=x.device).expand(b, -1).contiguous())
    owner.scatter_(1, others, assign)
    return targets, values.to(x.dtype), owner


def similarity_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    centres: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
) -> torch.Tensor:
    """PruMerge's recovery (arXiv 2403.15388, code-exact): every centre absorbs the
    ``topk`` other tokens whose ``metric`` is most cosine-similar to its own,
    ``x_i + sum_j w_j x_j`` with unnormalised weights ``w`` ([B, N]).
    Returns the updated centres ``[B, k, C]`` and the absorbed tokens ``[B, k, topk]``
    (indices into ``x``)."""
    m = F.normalize(metric.float(), dim=-1)
    sim = _gather(m, centres) @ m.transpose(-1, -2)
    sim.scatter_(-1, centres.unsqueeze(-1), float("-inf"))
    top = sim.topk(min(topk, x.shape[1] - 1), dim=-1).indices
    w = weights.float().gather(1, top.flatten(1)).view_as(top)
    xs = x.float().gather(1, top.flatten(1).unsqueeze(-1).expand(-1, -1, x.shape[-1])).view(*top.shape, -1)
    return (_gather(x, centres).float() + (w.unsqueeze(-1) * xs).sum(dim=2)).to(x.dtype), top


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, protect_first: bool = False, offset: int = 0, sort_unmerged: bool = True,
    sets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching (arXiv 2210.09461; facebookresearch/ToMe ``tome/merge.py``).

    Tokens alternate into sets A and B by their place in the whole sequence: token ``p`` of
    ``metric [B, n, C]`` is in A when ``offset + p`` is even (``offset``: tokens before these in
    the sequence, such as a prefix kept outside them, so the split is the official code's over
    the full sequence). Each A token's best B match by cosine of ``metric`` is found; the ``r``
    best-matched A tokens (stable descending sort of the best scores) are merged into their B
    partners; ``r`` is capped at ``(n - protect_first) // 2`` and ``r <= 0`` changes nothing.
    ``protect_first``: token 0 (a CLS token inside ``metric``, offset 0) is never a source.
    ``sort_unmerged``: the unmerged A tokens in sequence order (the official code sorts them
    when the model has a class token; otherwise they stay in descending order of best score).
    ``sets``: ``(a_idx, b_idx)``, 1-D indices that split the tokens into A and B in place of the
    alternation (ToMeSD's 2-D stride partition, :func:`.stride_partition.stride_partition`);
    ``r`` is then capped at ``len(a_idx)`` instead.

    Returns ``(merge, provenance, keep)``: ``keep [B, n - r]``, the input token each output slot
    comes from (``[unmerged A, all B]``; a B slot stands for its group); ``provenance [B, n]``,
    each input token's output slot; ``merge(x, size)``, the size-weighted means ``[B, n - r, C]``
    of ``x``'s groups and their summed sizes (``size`` None: one each).
    """
    b, n, _ = metric.shape
    r = min(r, (n - int(protect_first)) // 2 if sets is None else sets[0].numel())
    device = metric.device
    if r <= 0:
        identity = torch.arange(n, device=device).expand(b, -1)

        def unchanged(x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            return x, torch.ones(x.shape[:2], device=x.device) if size is None else size.float()

        return unchanged, identity, identity
    m = F.normalize(metric.float(), dim=-1)
    if sets is None:
        a_idx = torch.arange(offset % 2, n, 2, device=device)
        b_idx = torch.arange(1 - offset % 2, n, 2, device=device)
    else:
        a_idx, b_idx = (s.to(device) for s in sets)
    scores = m[:, a_idx] @ m[:, b_idx].transpose(-1, -2)
    if protect_first:
        scores[:, 0, :] = float("-inf")
    best, match = scores.max(dim=-1)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    src = order[:, :r]
    unm = torch.sort(order[:, r:], dim=-1).values if sort_unmerged else order[:, r:]
    dst = match.gather(1, src)
    n_unm = unm.shape[1]

    provenance = torch.empty(b, n, dtype=torch.long, device=device)
    provenance[:, b_idx] = n_unm + torch.arange(b_idx.numel(), device=device)
    provenance.scatter_(1, a_idx[unm], torch.arange(n_unm, device=device).expand(b, -1))
    provenance.scatter_(1, a_idx[src], n_unm + dst)
    keep = torch.cat([a_idx[unm], b_idx.expand(b, -1)], dim=1)

    def merge(x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        size = torch.ones(x.shape[0], x.shape[1], device=x.device) if size is None else size.float()
        weighted = x.float() * size.unsqueeze(-1)
        out = torch.zeros(b, n - r, x.shape[-1], device=x.device).scatter_add_(
            1, provenance.unsqueeze(-1).expand_as(weighted), weighted
        )
        out_size = torch.zeros(b, n - r, device=x.device).scatter_add_(1, provenance, size)
        return (out / out_size.unsqueeze(-1)).to(x.dtype), out_size

    return merge, provenance, keep


def recycle_by_cell(
    x: torch.Tensor,
    importance: torch.Tensor,
    pruned: torch.Tensor,
    raster: torch.Tensor,
    cols: int,
    cell: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VFlowOpt's recycling (arXiv 2508.05211, code-exact) for one image.

    ``x`` ``[N, C]`` tokens, ``importance`` ``[N]``, ``pruned`` ``[N]`` bool, ``raster`` ``[N]``
    raster indices on a grid ``cols`` wide. The pruned tokens are grouped by coarse cells of
    side ``cell`` (``floor(row / cell), floor(col / cell)``); every non-empty group's
    importance-weighted mean ``sum_i (I_i / sum I) x_i`` overwrites the group's most important
    member, which is kept. Returns ``(keep [k] ascending, values [k, C], owner [N])``: the kept
    tokens' values (unchanged for tokens that were never pruned) and, for every token, the
    position in ``keep`` of the token carrying it (itself when kept).
    """
    row, col = raster // cols, raster % cols
    cell_id = torch.stack([(row.double() / cell).floor(), (col.double() / cell).floor()], dim=-1)
    values = x.clone()
    keep = ~pruned
    carrier_of = torch.arange(x.shape[0], device=x.device)
    idx = pruned.nonzero().flatten()
    if idx.numel():
        _, group = torch.unique(cell_id[idx], dim=0, return_inverse=True)
        for g in range(int(group.max()) + 1):
            members = idx[group == g]
            w = importance[members].float()
            total = w.sum()
            w = w / total if total != 0 else torch.full_like(w, 1.0 / w.numel())
            carrier = members[importance[members].argmax()]
            values[carrier] = (w[:, None] * x[members].float()).sum(dim=0).to(x.dtype)
            keep[carrier] = True
            carrier_of[members] = carrier
    kept = keep.nonzero().flatten()
    position = torch.cumsum(keep.long(), 0) - 1  # position in kept of each kept token
    return kept, values[kept], position[carrier_of]
