"""Scorers: per-token importance signals computed from attention projections and features."""

from __future__ import annotations

from typing import Callable

import torch


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities of a few query rows: ``softmax(q k^T * scale)``.

    ``q`` is ``[B, H, Nq, d]``, ``k`` is ``[B, Hk, Nk, d]`` (``Hk`` divides ``H``:
    grouped-query keys are repeated). ``key_mask`` (``[B, Nq or 1, Nk]`` bool, True =
    may attend) hides padding or future keys. Returns ``[B, H, Nq, Nk]`` in float32.
    Cost is ``O(Nq * Nk)`` per head, which is what lets a model keep SDPA.
    """
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None], float("-inf"))
    return logits.softmax(dim=-1)


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, reduce: str = "mean") -> torch.Tensor:
    """CLS -> patch attention ``[B, N]`` (CLS is token 0; its own column is dropped).

    ``reduce`` combines heads: ``"mean"`` or ``"sum"`` (VisionZip sums).
    """
    rows = attention_rows(q[:, :, :1], k, scale)[:, :, 0, 1:]
    if reduce == "mean":
        return rows.mean(dim=1)
    if reduce == "sum":
        return rows.sum(dim=1)
    raise ValueError(f"reduce must be one of 'mean', 'sum', got {reduce!r}")


def entropy(p: torch.Tensor, dim: int = -1, normalise: bool = True) -> torch.Tensor:
    """Shannon entropy of distributions along ``dim``; ``normalise`` first rescales to sum 1."""
    p = p.float()
    if normalise:
        p = p / p.sum(dim=dim, keepdim=True).clamp_min(1e-12)
    return -(p * p.clamp_min(1e-12).log()).sum(dim=dim)


def value_norm(v: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """Norm of value vectors averaged over heads: ``[B, H, N, d] -> [B, N]``."""
    return v.float().mean(dim=1).norm(p=p, dim=-1)


def received_attention(probs: torch.Tensor, skip_first: bool = False, reduce: str = "mean") -> torch.Tensor:
    """Attention each token *receives*: ``[B, H, T, T]`` probabilities averaged over heads and
    then over (``"mean"``) or summed over (``"sum"``) all query rows, ``[B, T]``;
    ``skip_first`` drops the first column (a CLS token) after the reduction (HiPrune's global
    attention, FoPru's significance)."""
    per_key = probs.float().mean(dim=1)
    if reduce == "mean":
        out = per_key.mean(dim=1)
    elif reduce == "sum":
        out = per_key.sum(dim=1)
    else:
        raise ValueError(f"reduce must be one of 'mean', 'sum', got {reduce!r}")
    return out[:, 1:] if skip_first else out


def context_relevance(probs: torch.Tensor, t: float) -> torch.Tensor:
    """VFlowOpt's context relevance (arXiv 2508.05211): with ``A`` the head-mean attention
    (``[B, H, T, T]`` probabilities), the *global* tokens are those whose received attention
    ``rho_j = mean_i A_ij`` exceeds ``t * mean(rho)``; each token's relevance is the attention
    the global tokens pay it, ``c_j = mean_{g in G} A_gj``. ``[B, T]``. When no token passes
    the threshold the token with the largest ``rho`` is the global set (the official code
    averages an empty set into NaN)."""
    a = probs.float().mean(dim=1)
    rho = received_attention(probs)
    glob = rho > t * rho.mean(dim=-1, keepdim=True)
    empty = ~glob.any(dim=-1)
    glob[empty, rho[empty].argmax(dim=-1)] = True
    w = glob.float() / glob.sum(dim=-1, keepdim=True)
    return (w.unsqueeze(1) @ a).squeeze(1)


def histogram_entropy(levels: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Shannon entropy in bits of the histogram of integer ``levels`` in ``[0, bins)`` along the
    last axis (one histogram per leading index): a constant patch gives 0, ``n`` distinct
    equally frequent levels give ``log2(n)``."""
    flat = levels.reshape(-1, levels.shape[-1]).long()
    hist = torch.zeros(flat.shape[0], bins, device=levels.device).scatter_add_(
        1, flat, torch.ones_like(flat, dtype=torch.float)
    )
    p = hist / hist.sum(dim=-1, keepdim=True)
    ent = -(p * torch.log2(p.clamp_min(1e-30))).sum(dim=-1)
    return ent.view(levels.shape[:-1])


def perturbation_sensitivity(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    directions: torch.Tensor,
    h: float,
    chunk: int = 16,
) -> torch.Tensor:
    """Zeroth-order sensitivity of a row-wise map ``fn`` at every token (ZOO-Prune,
    arXiv 2509.24837): ``s_i = mean_j ||fn(x_i + h u_j) - fn(x_i - h u_j)|| / (2h)`` with the
    same unit directions ``u_j`` (``[m, C]``) for every token, an estimate of
    ``E_u ||J_fn(x_i) u||``. ``x``: ``[B, N, C]``; directions are evaluated ``chunk`` at a time
    (memory only). Returns ``[B, N]`` in float32 (float64 when ``fn`` returns float64)."""
    b, n, c = x.shape
    total = None
    for start in range(0, directions.shape[0], chunk):
        u = directions[start : start + chunk].to(x.dtype)
        step = (h * u)[None, :, None, :]  # [1, m', 1, C]
        plus = fn((x[:, None] + step).reshape(-1, c))
        minus = fn((x[:, None] - step).reshape(-1, c))
        acc = torch.promote_types(plus.dtype, torch.float32)
        diff = (plus.to(acc) - minus.to(acc)).view(b, u.shape[0], n, -1)
        part = (diff.norm(dim=-1) / (2 * h)).sum(dim=1)
        total = part if total is None else total + part
    return total / directions.shape[0]


def transition_variation(
    x_in: torch.Tensor, x_out: torch.Tensor, valid: torch.Tensor | None = None, direction: str = "signed"
) -> torch.Tensor:
    """Token transition variation of one sub-layer (TransPrune, arXiv 2507.20630): for each token,
    the norm ratio ``||x_out|| / ||x_in||`` times the softmax over the sequence of the direction
    change ``1 - cos(x_in, x_out)`` (``direction="signed"``, the official code) or
    ``1 - |cos|`` (``"abs"``, the paper's Eq. 2). ``x_in``/``x_out``: ``[B, L, D]``, the
    sub-layer's (normalised) input and its output before the residual add; ``valid``
    (``[B, L]`` bool) restricts the softmax to real tokens, one softmax per row (the official
    code sums over the whole batch). Returns ``[B, L]`` in float32, 0 where not valid."""
    if direction not in ("signed", "abs"):
        raise ValueError(f"direction must be 'signed' or 'abs', got {direction!r}")
    a, b = x_in.float(), x_out.float()
    ratio = b.norm(dim=-1) / a.norm(dim=-1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    change = 1 - (cos.abs() if direction == "abs" else cos)
    if valid is not None:
        change = change.masked_fill(~valid, float("-inf"))
    weight = ratio * change.softmax(dim=-1)
    return weight if valid is None else weight.masked_fill(~valid, 0.0)
