"""Selectors: turn scores or features into the indices of the tokens to keep.

Every selector returns ``long`` indices of shape ``[B, k]``, unique per row and
in range; the ones documented as order-keeping return them sorted ascending.
"""

from __future__ import annotations

import math

import torch


def _check_k(k: int, n: int, name: str = "k") -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 0 < k <= n:
        raise ValueError(f"{name} must be in [1, {n}] (the number of tokens), got {k}")


def topk_keep_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores per row, sorted ascending (original order kept).

    Ties are broken towards the lower index, so the result is deterministic.
    """
    _check_k(k, scores.shape[-1])
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.sort(order[..., :k], dim=-1).values


def _farthest_point_greedy(
    dist: torch.Tensor, k: int, first: torch.Tensor, weights: torch.Tensor | None = None, aggregate: str = "min"
) -> torch.Tensor:
    """Greedy diversity on a distance matrix ``[B, N, N]``: start at ``first`` and repeatedly add
    the token whose ``aggregate`` (``"min"``: Gonzalez's k-center / max-min rule; ``"sum"``:
    max-sum) of distances to the chosen set is largest (times ``weights`` [B, N] when given).
    Returns indices in pick order ``[B, k]``; ties go to the lower index."""
    b, n, _ = dist.shape
    rows = torch.arange(b, device=dist.device)
    picks = torch.empty(b, k, dtype=torch.long, device=dist.device)
    picks[:, 0] = first
    chosen = torch.zeros(b, n, dtype=torch.bool, device=dist.device)
    chosen[rows, first] = True
    score = dist[rows, first].clone()
    for i in range(1, k):
        gain = score if weights is None else score * weights
        nxt = gain.masked_fill(chosen, float("-inf")).argmax(dim=-1)
        picks[:, i] = nxt
        chosen[rows, nxt] = True
        score = torch.minimum(score, dist[rows, nxt]) if aggregate == "min" else score + dist[rows, nxt]
    return picks


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between all pairs of tokens: ``[B, N, C] -> [B, N, N]``."""
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    return 1.0 - xn @ xn.transpose(-1, -2)


def pairwise_distance(x: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """All-pairs distances ``[B, N, C] -> [B, N, N]``: ``"cosine"`` (1 - cos) or ``"euclidean"``."""
    if metric == "cosine":
        return cosine_distance(x)
    if metric == "euclidean":
        return torch.cdist(x.float(), x.float())
    raise ValueError(f"metric must be one of 'cosine', 'euclidean', got {metric!r}")


def max_min_diversity(x: torch.Tensor, k: int, keep_order: bool = True) -> torch.Tensor:
    """DivPrune's greedy Max-Min Diversity selection on cosine distance.

    The first pick is the token whose nearest neighbour is farthest (largest
    smallest off-diagonal distance); each later pick maximises its minimum
    distance to the picked set (arXiv 2503.02175). ``keep_order=False`` returns
    indices in pick order.
    """
    _check_k(k, x.shape[1])
    dist = cosine_distance(x)
    eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
    nn_dist = dist.masked_fill(eye, float("inf")).min(dim=-1).values
    picks = _farthest_point_greedy(dist, k, nn_dist.argmax(dim=-1))
    return torch.sort(picks, dim=-1).values if keep_order else picks


def greedy_k_center(
    x: torch.Tensor,
    k: int,
    metric: str = "cosine",
    first: torch.Tensor | None = None,
    keep_order: bool = True,
) -> torch.Tensor:
    """Greedy k-center (Gonzalez): a 2-approximation of the minimal covering radius.

    ``first`` ([B] indices) seeds the set; by default the token with the largest
    feature norm. ``metric`` is ``"cosine"`` (1 - cos) or ``"euclidean"``.
    """
    _check_k(k, x.shape[1])
    dist = pairwise_distance(x, metric)
    if first is None:
        first = x.float().norm(dim=-1).argmax(dim=-1)
    picks = _farthest_point_greedy(dist, k, first)
    return torch.sort(picks, dim=-1).values if keep_order else picks


def uniform_grid(rows: int, cols: int, k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Exactly ``k`` raster indices spread evenly over a ``rows x cols`` grid, sorted.

    A lattice of ``r x c`` cell centres with ``r * c >= k`` and aspect close to
    the grid's is built; when it has more than ``k`` points an evenly strided
    subset of them is taken.
    """
    n = rows * cols
    _check_k(k, n)
    r = min(rows, max(1, round(math.sqrt(k * rows / cols))))
    c = min(cols, math.ceil(k / r))
    while r * c < k:
        if r < rows:
            r += 1
        else:
            c += 1
    ys = ((torch.arange(r, dtype=torch.float64) + 0.5) * rows / r).floor().long()
    xs = ((torch.arange(c, dtype=torch.float64) + 0.5) * cols / c).floor().long()
    lattice = (ys[:, None] * cols + xs[None, :]).flatten()
    if lattice.numel() > k:
        pick = (torch.arange(k, dtype=torch.float64) * lattice.numel() / k).floor().long()
        lattice = lattice[pick]
    return torch.sort(lattice).values.to(device)


def stride_grid_mask(token_index: torch.Tensor, cols: int, stride: int) -> torch.Tensor:
    """True where a token's raster index (``token_index``, any shape) lies on every
    ``stride``-th row and column of a ``cols``-wide grid, starting at (0, 0) (``grid[::s, ::s]``:
    FEATHER's stage-1 grid, ATP's SAP grid); a token with no grid origin (raster -1, e.g. a CLS
    token fed to the LLM) is never on it."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return (token_index >= 0) & (token_index // cols % stride == 0) & (token_index % cols % stride == 0)


def allocate_budget(weights: torch.Tensor, total: int, capacity: torch.Tensor | None = None) -> torch.Tensor:
    """Split ``total`` slots over regions in proportion to ``weights`` ([B, R], non-negative).

    ``floor(w_r / sum(w) * total)`` each, then the remaining slots go one each to the
    regions with the largest weights (HoloV's rule). With ``capacity`` ([R] or [B, R])
    no region receives more than it holds; the overflow goes to the next regions by
    weight. Returns ``long [B, R]`` whose rows sum to ``total`` (when capacity allows).
    """
    w = weights.double().clamp_min(0)
    b, r = w.shape
    share = w / (w.sum(-1, keepdim=True) + 1e-12) * total
    alloc = share.floor().long()
    rank = torch.sort(w, dim=-1, descending=True, stable=True).indices
    if capacity is not None:
        cap = capacity.to(alloc.device).long().expand(b, r)
        if (cap.sum(-1) < total).any():
            raise ValueError(f"total={total} exceeds the regions' capacity {cap.sum(-1).tolist()}")
        alloc = torch.minimum(alloc, cap)
    else:
        cap = torch.full_like(alloc, total)
    for row in range(b):
        missing = total - int(alloc[row].sum())
        while missing > 0:
            for region in rank[row].tolist():
                if missing == 0:
                    break
                if alloc[row, region] < cap[row, region]:
                    alloc[row, region] += 1
                    missing -= 1
    return alloc


def union_keep(a: torch.Tensor, b: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Row-wise sorted union of two index sets (rows may differ in length, so a list)."""
    out = []
    for ra, rb in zip(a, b):
        mask = torch.zeros(n, dtype=torch.bool, device=ra.device)
        mask[ra] = True
        mask[rb] = True
        out.append(mask.nonzero().flatten())
    return out


def chunk_groups(n: int, parts: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Region id ``[n]`` of each position when a sequence is cut into ``parts`` contiguous 1-D
    chunks: each holds ``n // parts`` tokens and the first ``n % parts`` one more (HoloV's
    crops, which cross image rows)."""
    if not 1 <= parts <= n:
        raise ValueError(f"parts must be in [1, {n}] (the number of tokens), got {parts}")
    sizes = torch.full((parts,), n // parts, dtype=torch.long)
    sizes[: n % parts] += 1
    return torch.repeat_interleave(torch.arange(parts), sizes).to(device)


def tile_groups(raster: torch.Tensor, rows: int, cols: int, parts: int) -> torch.Tensor:
    """Region id of each raster index (any shape) when a ``rows x cols`` grid is cut into
    ``parts = a x b`` 2-D tiles, ``a`` the divisor of ``parts`` closest to
    ``sqrt(parts * rows / cols)`` (square tiles on a square grid); tile edges at
    ``floor(i * rows / a)`` and ``floor(j * cols / b)``, ids in raster order of the tiles."""
    if not 1 <= parts <= rows * cols:
        raise ValueError(f"parts must be in [1, {rows * cols}] (the grid size), got {parts}")
    ideal = math.sqrt(parts * rows / cols)
    a = min((d for d in range(1, parts + 1) if parts % d == 0), key=lambda d: (abs(d - ideal), d))
    b = parts // a
    if a > rows or b > cols:
        raise ValueError(f"cannot cut a {rows}x{cols} grid into {a}x{b} tiles")
    y, x = raster // cols, raster % cols
    return (y * a // rows) * b + x * b // cols


def rank_within_groups(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Rank ``[B, N]`` of every token among the tokens of its group (0 = highest score;
    ties towards the lower index). ``groups``: ``[N]`` or ``[B, N]`` region ids in ``[0, G)``."""
    b, n = scores.shape
    groups = groups.to(scores.device).long().expand(b, n)
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    by_group = torch.sort(groups.gather(1, by_score), dim=-1, stable=True).indices
    perm = by_score.gather(1, by_group)  # tokens ordered by (group, score desc, index)
    n_groups = int(groups.max()) + 1
    counts = torch.zeros(b, n_groups, dtype=torch.long, device=scores.device).scatter_add_(
        1, groups, torch.ones_like(groups)
    )
    starts = counts.cumsum(-1) - counts
    within = torch.arange(n, device=scores.device).expand(b, n) - starts.gather(1, groups.gather(1, perm))
    return torch.empty_like(within).scatter_(1, perm, within)


def topk_per_group(scores: torch.Tensor, groups: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """Keep mask ``[B, N]``: the ``quota[b, g]`` highest-scoring tokens of every group ``g``
    (a whole group when its quota reaches its size). ``quota``: ``[G]`` or ``[B, G]``."""
    b, n = scores.shape
    groups = groups.to(scores.device).long().expand(b, n)
    quota = quota.to(scores.device).long().expand(b, -1)
    return rank_within_groups(scores, groups) < quota.gather(1, groups)


def greedy_max_sum(
    x: torch.Tensor,
    k: int,
    metric: str = "cosine",
    first: torch.Tensor | None = None,
    keep_order: bool = True,
) -> torch.Tensor:
    """Greedy max-sum diversification (no quality term): start at ``first`` ([B]; default the
    largest-norm token) and repeatedly add the token whose *sum* of distances to the chosen
    set is largest (k-center uses the minimum). Ties go to the lower index."""
    _check_k(k, x.shape[1])
    if first is None:
        first = x.float().norm(dim=-1).argmax(dim=-1)
    picks = _farthest_point_greedy(pairwise_distance(x, metric), k, first, aggregate="sum")
    return torch.sort(picks, dim=-1).values if keep_order else picks


def weighted_max_min(
    x: torch.Tensor, k: int, weights: torch.Tensor, metric: str = "cosine", keep_order: bool = True
) -> torch.Tensor:
    """Score-weighted max-min diversity: the first pick is ``argmax weights`` ([B, N]), each
    later pick maximises ``weights_i * min_{a in S} dist(a, i)`` (ZOO-Prune's SADS; with
    constant weights it is farthest-point sampling from token 0). Ties go to the lower index."""
    _check_k(k, x.shape[1])
    w = weights.float()
    picks = _farthest_point_greedy(pairwise_distance(x, metric), k, w.argmax(dim=-1), weights=w)
    return torch.sort(picks, dim=-1).values if keep_order else picks
