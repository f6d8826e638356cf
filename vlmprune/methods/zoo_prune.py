"""ZOO-Prune: zeroth-order sensitivity of the projector times max-min diversity, before the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from ..context import Selection, TokenContext
from ..method import Method, option
from ..primitives.scoring import perturbation_sensitivity
from ..primitives.selection import weighted_max_min
from ..registry import register


def minmax_normalise(s: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
    """``(s - min) / (max - min + 1e-8)`` per row, or all ones where the row is constant: its
    spread within ``rtol`` of its largest value (ours: the official strict ``max > min`` test
    turns the float32 rounding noise of a linear projector, ~1e-5 relative with ``h = 0.01``,
    into a random order; a GELU projector's sensitivities spread far more; fp16 noise is
    larger still, hence ``precision='fp32'``)."""
    lo, hi = s.min(dim=-1, keepdim=True).values, s.max(dim=-1, keepdim=True).values
    flat = (hi - lo) <= rtol * hi.abs()
    return torch.where(flat, torch.ones_like(s), (s - lo) / (hi - lo + 1e-8))


@register
@dataclass
class ZOOPrune(Method):
    """ZOO-Prune (Kim et al., arXiv 2509.24837; code AIM-SKKU/ZOO-Prune, ``llava_arch.py``).

    1. ``m`` Gaussian directions ``u_j`` in the vision-feature space, each normalised to unit
       length, are drawn from a generator seeded with ``seed`` at every call and applied to
       every token (:func:`~vlmprune.primitives.scoring.perturbation_sensitivity`).
    2. Sensitivity ``s_i = mean_j ||P(f_i + h u_j) - P(f_i - h u_j)|| / (2h)`` through the
       multimodal projector ``P`` (central differences), min-max normalised to ``[0, 1]``
       (all ones when constant).
    3. Greedy sensitivity-aware diverse selection on the cosine distance of the *projected*
       tokens (:func:`~vlmprune.primitives.selection.weighted_max_min`): the first pick is the
       most sensitive token, each later one maximises ``s_i * min_{a in S} D(a, i)``; kept in
       ascending order. Positions are renumbered (``compact``), as in the official code.

    On Qwen2-VL / 2.5-VL (ours; the official code is LLaVA-only, the card notes that Qwen's
    merger MLP gives a signal too) the projector is the 2x2 patch merger: each merged token's
    vision features are its four patches' last-block outputs concatenated (signal
    ``projector_input``, ``4 C_v`` wide), the directions live in that space, and the merger's own
    per-patch norm and MLP map them.

    With a purely linear projector the sensitivity is constant and the method is DivPrune's
    farthest-point rule started at token 0. Every call draws the same directions (the
    official code handles one image and re-draws them unseeded), so a batch gives the per-image
    results on every adapter, also where images of different sizes are separate calls (Qwen). ``precision='fp32'`` (the card's advice) runs the perturbation
    passes in float32 whatever the model's dtype; the default follows the official code, which
    runs the projector in the model's dtype (fp16 there).
    """

    name = "zoo_prune"
    stages = ("projector",)
    needs = frozenset({"projector", "projector_input", "projected"})
    paper = {
        "title": "ZOO-Prune: Training-Free Token Pruning via Zeroth-Order Gradient Estimation in Vision-Language Models",
        "arxiv": "2509.24837",
    }

    m: int = option(64, "number of random directions (NOISERECOV_NUM=64 in run_zoo_prune.sh)")
    h: float = option(0.01, "finite-difference step (NOISERECOV_INTENS=0.01 in run_zoo_prune.sh)")
    precision: str = option(
        "model", "dtype of the perturbation passes: the projector's own (official: fp16) or fp32", choices=("model", "fp32")
    )
    chunk: int = option(16, "directions per projector call (memory only; not in the paper)")

    def __post_init__(self):
        super().__post_init__()
        for key in ("m", "chunk"):
            if getattr(self, key) < 1:
                raise ValueError(f"option {key!r} of method 'zoo_prune' must be >= 1, got {getattr(self, key)}")
        if not self.h > 0:
            raise ValueError(f"option 'h' of method 'zoo_prune' must be > 0, got {self.h}")

    def directions(self, dim: int, generator: torch.Generator) -> torch.Tensor:
        """``[m, dim]`` unit Gaussian directions from ``generator`` (float32)."""
        u = torch.randn(self.m, dim, generator=generator, device=generator.device)
        return u / (u.norm(dim=-1, keepdim=True) + 1e-12)

    def sensitivity(self, feats: torch.Tensor, projector: torch.nn.Module, u: torch.Tensor) -> torch.Tensor:
        """Zeroth-order sensitivity ``[B, N]`` of ``projector`` at ``feats`` ``[B, N, C]``."""
        if self.precision == "fp32":
            params = {k: v.float() for k, v in projector.named_parameters()}

            def fn(z):
                return functional_call(projector, params, (z,))

            x = feats.float()
        else:
            dtype = next(projector.parameters()).dtype

            def fn(z):
                return projector(z.to(dtype))

            x = feats
        return perturbation_sensitivity(fn, x, u.to(x.device), self.h, self.chunk)

    def select(self, ctx: TokenContext) -> Selection:
        feats = ctx.signals.projector_input()
        generator = torch.Generator(device=ctx.generator.device).manual_seed(self.seed)
        u = self.directions(feats.shape[-1], generator)
        s = self.sensitivity(feats, ctx.signals.projector(), u)
        weights = minmax_normalise(s).float()
        keep = weighted_max_min(ctx.signals.projected(), ctx.budget, weights)
        return Selection(keep=keep, scores=weights)
