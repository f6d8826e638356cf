"""Scorers: per-token importance signals computed from attention projections and features."""

from __future__ import annotations

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
