"""ATP-LLaVA: per-layer, per-instance adaptive pruning inside the LLM with a spatial (SAP) guarantee.

Two variants share one method, ``"atp"``:

* **ATP-TF** (default, training-free, the method card's approximation): cumulative-mass thresholds.
* **ATP (learned thresholds)**: the paper's instance-wise threshold heads, trained by
  ``python -m vlmprune.tools.train_atp`` and loaded with ``vlmprune.wrap(model, "atp", weights=path)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..context import Point, Selection, TokenContext
from ..method import Method, option
from ..primitives.selection import stride_grid_mask
from ..registry import register
from ..weights import load_module, save_module

#: what a weights file of the learned variant records in its safetensors metadata
WEIGHTS_FORMAT = "vlmprune-atp-heads-1"
#: pooled score statistics the threshold heads read (see :func:`head_features`)
N_FEATURES = 7


# ----------------------------------------------------------------------------------- pure pieces
def atp_points(layers, masses, strides, layers_of: int, depth: int) -> list[tuple[int, float, int]]:
    """``(layer, mass, stride)`` of each pruning point on a ``depth``-layer LLM.

    Layers ``K`` of a ``layers_of``-layer LLM map to ``floor(K depth / layers_of + 0.5)``
    clamped to ``[1, depth - 1]`` (``layers_of = 0``: used as given, and must lie there).
    Modules that land on the same point are merged into one: its mass is the product of
    theirs (what applying both gives on flat attention, the calibration reference) and its
    SAP stride the later module's. {2, 8, 16, 24} of 32 give {1, 2, 3} of 4 with masses
    0.72, 0.7, 0.6."""
    if not (len(layers) == len(masses) == len(strides)) or not layers:
        raise ValueError(
            f"options 'layers', 'mass' and 'sap_strides' of method 'atp' need one entry per insertion layer, "
            f"got {tuple(layers)}, {tuple(masses)}, {tuple(strides)}"
        )
    merged: dict[int, list] = {}
    for k, p, s in zip(layers, masses, strides):
        if layers_of:
            at = min(depth - 1, max(1, int(k * depth / layers_of + 0.5)))
        else:
            at = int(k)
            if not 1 <= at < depth:
                raise ValueError(f"option 'layers' of method 'atp': layer {at} is outside [1, {depth - 1}] on this {depth}-layer LLM")
        if at in merged:
            merged[at][0] *= p
            merged[at][1] = s
        else:
            merged[at] = [float(p), int(s)]
    return [(k, v[0], v[1]) for k, v in sorted(merged.items())]


def scale_masses(masses, ratio: float) -> list[float]:
    """Masses ``min(1, a p_t)`` with ``a`` chosen so that their product equals ``ratio``
    (``budget / N``): on flat attention (the largest set any mass threshold can keep) the last
    point then keeps ``budget`` tokens; peakier attention keeps fewer. ``ratio >= 1``: all 1."""
    masses = [float(p) for p in masses]
    if ratio >= 1.0:
        return [1.0] * len(masses)
    ratio = max(ratio, 1e-9)

    def product(a: float) -> float:
        return math.prod(min(1.0, a * p) for p in masses)

    lo, hi = 0.0, 1.0 / min(masses)
    for _ in range(100):  # product() is continuous and non-decreasing in a
        mid = (lo + hi) / 2
        if product(mid) < ratio:
            lo = mid
        else:
            hi = mid
    return [min(1.0, hi * p) for p in masses]


def cumulative_mass_keep(scores: torch.Tensor, mass: float | torch.Tensor, min_keep: int = 1) -> torch.Tensor:
    """``[B, N]`` bool: per row, the smallest set of highest scores whose share of the row's
    total reaches ``mass`` (``>= 1``: every token), at least ``min_keep`` tokens. Ties are
    broken towards the lower index. Raising ``mass`` never shrinks the set."""
    b, n = scores.shape
    if n == 0:
        return torch.zeros(b, 0, dtype=torch.bool, device=scores.device)
    mass = torch.as_tensor(mass, dtype=torch.float64, device=scores.device).expand(b)
    s = scores.double().clamp_min(0)
    s = s / s.sum(-1, keepdim=True).clamp_min(1e-30)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    cum = s.gather(1, order).cumsum(-1)
    # count = 1 + number of prefixes still short of the mass (tolerance for rounding)
    count = (cum < (mass[:, None] - 1e-9)).sum(-1) + 1
    count = torch.where(mass >= 1.0, torch.full_like(count, n), count).clamp(min=min(min_keep, n), max=n)
    keep = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
    rank = torch.arange(n, device=scores.device).expand(b, -1)
    keep.scatter_(1, order, rank < count[:, None])
    return keep


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Per row, rescaled to [0, 1] (a constant row gives zeros)."""
    lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def spatial_score(token_index: torch.Tensor, cols: int, stride: int) -> torch.Tensor:
    """SAP's spatial score ``[B, N]``: 1 on the uniform grid of every ``stride``-th row and
    column from (0, 0), 0.5 on the twice finer grid (``stride // 2``, when > 1), else 0
    (a reconstruction: the paper's exact spatial score is [unverified])."""
    s = torch.zeros(token_index.shape, dtype=torch.float32, device=token_index.device)
    if stride >= 2:
        s = torch.where(stride_grid_mask(token_index, cols, stride // 2), torch.full_like(s, 0.5), s)
    if stride >= 1:
        s = torch.where(stride_grid_mask(token_index, cols, stride), torch.ones_like(s), s)
    return s


def head_features(s_self: torch.Tensor, s_cross: torch.Tensor, alive: float | torch.Tensor, ratio: float | torch.Tensor) -> torch.Tensor:
    """``[B, 7]`` inputs of a threshold head: mean and std of the min-max normalised self and
    cross scores, the normalised entropy of their mean, the fraction of the original tokens
    alive and the target keep ratio (``budget / N``)."""
    a, c = minmax(s_self.float()), minmax(s_cross.float())
    red = 0.5 * (a + c)
    p = red / red.sum(-1, keepdim=True).clamp_min(1e-12)
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(max(p.shape[-1], 2))
    b = s_self.shape[0]
    alive = torch.as_tensor(alive, dtype=torch.float32, device=s_self.device).expand(b)
    ratio = torch.as_tensor(ratio, dtype=torch.float32, device=s_self.device).expand(b)
    return torch.stack([a.mean(-1), a.std(-1), c.mean(-1), c.std(-1), ent, alive, ratio], -1)


class ThresholdHeads(nn.Module):
    """One tiny MLP per ATP module: pooled score statistics (:func:`head_features`) ->
    ``(theta_r, theta_s)`` in (0, 1). ``layers`` records the LLM layers the heads were
    trained at (they only load onto a model with the same points)."""

    def __init__(self, layers, hidden: int = 16, tau: float = 20.0):
        super().__init__()
        self.layers = tuple(int(k) for k in layers)
        self.hidden = hidden
        self.tau = float(tau)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.GELU(), nn.Linear(hidden, 2)) for _ in self.layers
        )
        for mlp in self.mlps:  # start near theta_r = sigmoid(0) = 0.5, theta_s = sigmoid(1) (coarse grid only)
            nn.init.zeros_(mlp[2].weight)
            with torch.no_grad():
                mlp[2].bias.copy_(torch.tensor([0.0, 1.0]))

    def forward(self, point: int, features: torch.Tensor) -> torch.Tensor:
        """``[B, 2]`` thresholds at the ``point``-th module."""
        return torch.sigmoid(self.mlps[point](features))

    def config(self) -> dict:
        return {"layers": list(self.layers), "hidden": self.hidden, "tau": self.tau}

    def save(self, path, extra: dict | None = None) -> None:
        save_module(self, path, fmt=WEIGHTS_FORMAT, method="atp", config=self.config(), training=extra)

    @classmethod
    def load(cls, path) -> "ThresholdHeads":
        return load_module(
            path, lambda cfg: cls(cfg["layers"], cfg["hidden"], cfg["tau"]), fmt=WEIGHTS_FORMAT, method="atp",
            kind="an ATP threshold-head", train="python -m vlmprune.tools.train_atp",
        )


# ----------------------------------------------------------------------------------- the method
@register
@dataclass
class ATP(Method):
    """ATP-LLaVA (Ye, Gan, Ge, Zhang, Tang, "ATP-LLaVA: Adaptive Token Pruning for Large Vision
    Language Models", arXiv 2412.00447, CVPR 2025; no official code: built from the paper's
    description through the method card, details marked [unverified] there).

    **Where**: before the LLM decoder layers ``layers`` of a ``layers_of``-layer LLM (card:
    {2, 8, 16, 24} of 32), mapped by :func:`atp_points` (clamped to ``[1, L - 1]``; modules
    that collide merge: {1, 2, 3} of 4 with masses 0.72, 0.7, 0.6). Kept tokens keep their
    original position ids (the paper's inference).

    **Scores** at the point before layer ``K``, from layer ``K - 1``'s own q and k (recomputed,
    SDPA stays on): ``S_cross`` = head-mean attention of the last prompt token to each image
    token (the card's cheap row); ``S_self`` = head-mean column means of the visual -> visual
    attention block (every current image token as a query, softmax over all keys it may see,
    i.e. the plain causal map's columns; O(N^2) per head). ``S_red = w S_self + (1 - w) S_cross``
    with ``w = self_weight`` (0.5: the card's average).

    **ATP-TF** (no weights; default): both scores are sum-normalised over the current image
    tokens, so ``S_red`` is a distribution; each point keeps the smallest set whose cumulative
    mass reaches ``p_t`` (:func:`cumulative_mass_keep`), at least ``min_keep`` tokens, union
    the SAP grid (every ``sap_strides[t]``-th row and column from (0, 0); card: stride 4, 2
    early). Peaky attention keeps fewer tokens than flat attention: per-instance, per-layer
    counts. **Budget** (the card asks to calibrate ``p_t`` so the average count matches the
    budget; this is a deterministic reading of that): ``p_t = min(1, a mass[t])`` with ``a``
    chosen so that ``prod p_t = budget / N`` (:func:`scale_masses`), i.e. on *flat* attention,
    the largest set a mass threshold can keep, the last point keeps ``budget`` tokens (plus
    the grid tokens outside the mass set); real, peakier attention keeps fewer, so the
    budget is the worst-case count, and the per-image counts are what ``handle.stats``
    reports. A budget of every token keeps everything. A schedule dict
    ``{"llm:K": count, ...}`` sets the flat-case count at a point (``p = count / n``).

    **Learned thresholds** (``weights=`` a file from ``python -m vlmprune.tools.train_atp``, or a
    :class:`ThresholdHeads`): per point a tiny MLP maps pooled score statistics
    (:func:`head_features`, including the target ratio ``budget / N``, so one set of heads
    serves several budgets) to ``theta_r, theta_s`` in (0, 1); a token is kept iff its
    min-max normalised ``S_red > theta_r`` or its spatial score (1 on the stride grid, 0.5 on
    the twice finer grid, :func:`spatial_score`) ``> theta_s``, at least ``min_keep`` tokens.
    Training (soft masks ``sigmoid((S - theta) tau)`` as a float key mask inside attention,
    LVLM frozen, LM loss + budget loss) is in :mod:`vlmprune.tools.train_atp`. A budget of every
    token keeps everything.

    **Deviations**: the LVLM is frozen during head training (the paper fine-tunes it with the
    modules, [unverified]); the spatial score's two levels and the head's inputs are
    reconstructions; ``S_self`` keeps the causal map's column means (early image tokens are
    seen by more queries).
    """

    name = "atp"
    stages = ("llm",)
    needs = frozenset({"text_attention"})
    positions = "original"
    accepts_weights = True
    paper = {"title": "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models", "arxiv": "2412.00447"}

    layers: tuple = option((2, 8, 16, 24), "insertion layers (card: {2, 8, 16, 24} of 32 for ATP-TF)")
    layers_of: int = option(32, "depth the layers refer to (LLaVA-1.5-7B: 32); 0: use them as given")
    mass: tuple = option((0.9, 0.8, 0.7, 0.6), "cumulative score mass kept per insertion layer before budget scaling (card's p_l)")
    sap_strides: tuple = option((2, 4, 4, 4), "SAP uniform-grid stride per insertion layer (card: 4, 2 early); 0: no grid")
    self_weight: float = option(0.5, "weight of S_self in S_red (card: the average of self and cross, 0.5)")
    min_keep: int = option(1, "tokens kept at least at every point (besides the grid)")

    def __post_init__(self):
        super().__post_init__()
        self.heads: ThresholdHeads | None = None
        if any(not 0 < p <= 1 for p in self.mass):
            raise ValueError(f"option 'mass' of method 'atp' must hold values in (0, 1], got {tuple(self.mass)}")
        if any(s < 0 for s in self.sap_strides):
            raise ValueError(f"option 'sap_strides' of method 'atp' must be >= 0 (0: no grid), got {tuple(self.sap_strides)}")
        if not 0.0 <= self.self_weight <= 1.0:
            raise ValueError(f"option 'self_weight' of method 'atp' must be in [0, 1], got {self.self_weight}")
        if self.min_keep < 0:
            raise ValueError(f"option 'min_keep' of method 'atp' must be >= 0, got {self.min_keep}")
        atp_points(self.layers, self.mass, self.sap_strides, self.layers_of, 10**6)  # lengths

    # -- weights -------------------------------------------------------------------------------------
    def load_weights(self, weights) -> None:
        """``weights``: a path written by ``python -m vlmprune.tools.train_atp`` or a :class:`ThresholdHeads`."""
        if isinstance(weights, ThresholdHeads):
            self.heads = weights.eval()
        elif isinstance(weights, (str, Path)):
            self.heads = ThresholdHeads.load(weights)
        else:
            raise TypeError(f"parameter 'weights' of method 'atp' must be a path or a ThresholdHeads, got {type(weights).__name__}")

    @property
    def variant(self) -> str:
        return "tf" if self.heads is None else "learned"

    # -- points --------------------------------------------------------------------------------------
    def schedule(self, info) -> list[tuple[int, float, int]]:
        pts = atp_points(self.layers, self.mass, self.sap_strides, self.layers_of, info.llm_layers)
        if self.heads is not None and tuple(k for k, _, _ in pts) != self.heads.layers:
            raise ValueError(
                f"parameter 'weights' of method 'atp': the heads were trained at LLM layers {self.heads.layers}, "
                f"this model's points are {tuple(k for k, _, _ in pts)}; train heads for it (python -m vlmprune.tools.train_atp)"
            )
        return pts

    def points(self, info):
        return [Point("llm", k) for k, _, _ in self.schedule(info)]

    def capture_layers(self, info):
        return {"encoder": (), "llm": tuple(k - 1 for k, _, _ in self.schedule(info))}

    # -- scores --------------------------------------------------------------------------------------
    def scores(self, ctx: TokenContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S_self, S_cross)`` ``[B, N]`` from layer ``K - 1``."""
        s_cross = ctx.signals.text_attention(layer=ctx.layer - 1, query="last").float()
        s_self = ctx.signals.text_attention(layer=ctx.layer - 1, query="visual").float()
        return s_self, s_cross

    def select(self, ctx: TokenContext) -> Selection:
        b, n = ctx.tokens.shape[:2]
        pts = self.schedule(ctx.info)
        t = [k for k, _, _ in pts].index(ctx.layer)
        if t == 0:
            for state in ctx.image_state:
                state[self.name] = {"n0": n, "ratio": ctx.target / max(n, 1), "scheduled": ctx.budget != ctx.target}
        st = ctx.image_state[0][self.name]
        if n == 0:
            return Selection(keep=torch.empty(b, 0, dtype=torch.long, device=ctx.tokens.device))
        all_kept = torch.arange(n, device=ctx.tokens.device).expand(b, -1)
        if st["ratio"] >= 1.0 and not st["scheduled"]:
            return Selection(keep=all_kept)
        s_self, s_cross = self.scores(ctx)
        stride = pts[t][2]
        cols = ctx.grid[1]
        if self.heads is None:
            red = self.self_weight * _sum_norm(s_self) + (1 - self.self_weight) * _sum_norm(s_cross)
            if st["scheduled"]:
                p = min(1.0, ctx.budget / n)
            else:
                p = scale_masses([m for _, m, _ in pts], st["ratio"])[t]
            keep = cumulative_mass_keep(red, p, self.min_keep)
            if stride:
                keep |= stride_grid_mask(ctx.token_index, cols, stride)
        else:
            red = self.self_weight * minmax(s_self) + (1 - self.self_weight) * minmax(s_cross)
            feats = head_features(s_self, s_cross, n / st["n0"], st["ratio"])
            theta = self.heads(t, feats.to(next(self.heads.parameters()).dtype)).float()
            keep = red > theta[:, :1]
            if stride:
                keep |= spatial_score(ctx.token_index, cols, stride) > theta[:, 1:]
            if self.min_keep:
                top = torch.sort(red, dim=-1, descending=True, stable=True).indices[:, : min(self.min_keep, n)]
                keep.scatter_(1, top, True)
        counts = keep.sum(1)
        if bool((counts == counts[0]).all()):
            return Selection(keep=keep.nonzero()[:, 1].view(b, int(counts[0])), scores=red)
        return Selection(keep=[row.nonzero().flatten() for row in keep], scores=red)


def _sum_norm(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp_min(0)
    return x / x.sum(-1, keepdim=True).clamp_min(1e-30)
