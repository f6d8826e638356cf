"""Local Outlier Factor on 1-D scores (Breunig et al., SIGMOD 2000), as scikit-learn's
``LocalOutlierFactor`` computes it: Recoverable Compression's dynamic scale filter."""

from __future__ import annotations

import torch


def local_outlier_factor(x: torch.Tensor, n_neighbors: int) -> torch.Tensor:
    """LOF of each entry of the 1-D ``x`` (scikit-learn's ``-negative_outlier_factor_``), in
    float64: ``k = min(n_neighbors, n - 1)`` nearest other entries by ``|x_i - x_j|``,
    reachability ``max(d(p, o), k-distance(o))``, local reachability density
    ``1 / (mean reachability + 1e-10)``, LOF = mean over the neighbours of
    ``lrd(o) / lrd(p)``. scikit-learn computes in its input's dtype (the RC code hands it
    float32): LOF values then agree to about 1e-6, the outliers unless one lies that close to 1.5."""
    if x.dim() != 1 or x.numel() < 2:
        raise ValueError(f"local_outlier_factor needs a 1-D tensor of at least 2 entries, got shape {tuple(x.shape)}")
    if n_neighbors < 1:
        raise ValueError(f"parameter 'n_neighbors' must be at least 1, got {n_neighbors}")
    v = x.detach().to(torch.float64)
    k = min(n_neighbors, v.numel() - 1)
    dist = (v[:, None] - v[None, :]).abs()
    dist.fill_diagonal_(float("inf"))  # a point is not its own neighbour
    near, idx = dist.topk(k, dim=1, largest=False)  # ascending distances
    k_distance = near[:, -1]
    reach = torch.maximum(near, k_distance[idx])
    lrd = 1.0 / (reach.mean(1) + 1e-10)
    return (lrd[idx] / lrd[:, None]).mean(1)


def lof_outlier_count(x: torch.Tensor, n_neighbors: int) -> int:
    """How many entries of the 1-D ``x`` are outliers with ``contamination="auto"``: LOF above
    1.5 (scikit-learn's fixed ``offset_ = -1.5`` on the negative LOF). Fewer than 2 entries:
    none (scikit-learn refuses them)."""
    if x.numel() < 2:
        return 0
    return int((-local_outlier_factor(x, n_neighbors) < -1.5).sum())
