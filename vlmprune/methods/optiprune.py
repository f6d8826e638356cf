"""OptiPrune (arXiv 2507.00789): SimPrune, similarity-based token pruning with max-similarity copy
recovery inside a diffusion UNet's transformer blocks (the registered method), and LatentMapper,
attention-guided optimisation of the initial noise with pruned forwards (:class:`LatentMapper`).

No official code exists; the paper's abstract and a third-party review give the scores, the rest
follows the two methods it builds on (ToMeSD's partition and copy unmerge, InitNO's
distribution-aware noise optimisation). Items marked [R] are our reconstruction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..context import Point, Selection, TokenContext
from ..registry import register
from .tomesd import StrideMatching


@register
@dataclass
class OptiPrune(StrideMatching):
    """OptiPrune's SimPrune (arXiv 2507.00789; no official code, reconstructed [R] where marked).

    In each transformer block at most ``max_downsample`` times smaller than the latent ([R]
    ToMeSD's default: the highest-resolution blocks), at every denoising step: one destination per
    ``sy x sx`` window, drawn at random (``use_rand``: "randomness for generalization"; the
    session's generator from ``seed``, one draw per block call shared by the batch's rows, also
    for odd batches) or its top-left token; each other token's score is its best cosine
    similarity to a destination ([R] on the block's input); the ``int(N * ratio)`` most redundant
    (highest score) are pruned; the branches the ``merge_*`` options name ([R] default
    self-attention only) run on the kept tokens, in raster order, and each pruned token gets a
    copy of its most similar kept token's output (maximum-similarity copying), so the next op sees
    the full grid. Unlike ToMeSD nothing is averaged: kept tokens keep their own values. Options
    and defaults are ToMeSD's ([R]). No budget: ``ratio`` sets the reduction
    (``wrap(unet, "optiprune", ratio=0.5)``). LatentMapper is :class:`LatentMapper`."""

    name = "optiprune"
    paper = {"title": "OptiPrune: Boosting Prompt-Image Consistency with Attention-Guided Noise and Dynamic "
                      "Token Selection", "arxiv": "2507.00789"}

    def select(self, ctx: TokenContext) -> Selection:
        _, provenance, keep = self.match(ctx)
        order = keep.argsort(-1)
        slot = order.argsort(-1)  # each matching slot's place among the kept tokens in raster order
        return Selection(keep=keep.gather(1, order), merge_map=slot.gather(1, provenance))


# -- LatentMapper's scores --------------------------------------------------------------------------
def subject_neglect(cross: torch.Tensor, subjects: list[int]) -> torch.Tensor:
    """``S_cross [B] = 1 - min_y max_p A_c^y(p)``: ``cross [B, P, T]`` cross-attention maps (pixels
    x text tokens), ``subjects`` the subject tokens' indices (the review's formula)."""
    return 1 - cross[:, :, subjects].amax(1).amin(1)


def subject_entanglement(cross: torch.Tensor, self_maps: torch.Tensor, subjects: list[int]) -> torch.Tensor:
    """``S_self [B]``: the mean over subject pairs of ``sum_p min(A_s^{p_i}, A_s^{p_j}) /
    sum_p (A_s^{p_i} + A_s^{p_j})``, ``p_i`` the pixel where subject ``i``'s cross map peaks and
    ``A_s^p`` row ``p`` of ``self_maps [B, P, P]`` (the review's formula); 0 with one subject."""
    if len(subjects) < 2:
        return cross.new_zeros(cross.shape[0])
    peaks = cross[:, :, subjects].argmax(1)  # [B, S]
    rows = self_maps.gather(1, peaks[..., None].expand(-1, -1, self_maps.shape[-1]))  # [B, S, P]
    pairs = torch.combinations(torch.arange(len(subjects), device=cross.device))
    a, b = rows[:, pairs[:, 0]], rows[:, pairs[:, 1]]
    return (torch.minimum(a, b).sum(-1) / (a + b).sum(-1).clamp_min(1e-12)).mean(-1)


def kl_to_prior(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Per-element mean of ``KL(N(mu, sigma^2) || N(0, 1))``."""
    return 0.5 * (torch.exp(2 * log_sigma) + mu**2 - 1 - 2 * log_sigma).mean()


@dataclass
class LatentMapper:
    """OptiPrune's LatentMapper ([R]: the review's scores, InitNO's optimisation): before sampling,
    the initial noise ``z_T = mu + sigma * eps`` is optimised, ``mu`` and ``log sigma`` starting at
    0 (the Gaussian prior), by ``iterations`` Adam steps of learning rate ``lr`` on ``S_cross +
    S_self + kl_weight * KL(N(mu, sigma^2) || N(0, I))`` (:func:`subject_neglect`,
    :func:`subject_entanglement`), stopping when ``S_cross < cross_threshold`` and ``S_self <
    self_threshold`` (InitNO-like values [R], unverified); an ``eps`` that does not get there is
    drawn again from ``generator`` up to ``rounds`` times in all, the lowest objective's noise
    returned. ``subjects``: the prompt's subject tokens (indices into the text).

    :meth:`map` reads the maps of one UNet call at ``timestep``: cross-attention probabilities
    over the text without its first (start) token, renormalised ([R] Attend-and-Excite's), and
    self-attention probabilities, heads and blocks averaged, from the transformer blocks at
    ``map_downsample`` (None: the highest-resolution ones with at most 16 x 16 tokens, the
    paper's 16 x 16 maps, else the coarsest). On a UNet wrapped with ``optiprune`` these are
    pruned forwards (OptiPrune's saving): pruned rows of a map are their kept token's (copy
    recovery) and a kept token's attention mass is spread evenly over the tokens copied from it;
    the handle's session is reset afterwards, so sampling starts at step 0.
    """

    subjects: tuple[int, ...]
    iterations: int = 10
    lr: float = 0.05
    kl_weight: float = 1.0
    cross_threshold: float = 0.2
    self_threshold: float = 0.3
    rounds: int = 1
    map_downsample: int | None = None

    def __post_init__(self):
        if not self.subjects or not all(isinstance(s, int) and s >= 1 for s in self.subjects):
            raise ValueError(f"parameter 'subjects' must name text token indices >= 1 (0 is the start token), got {self.subjects!r}")
        for name in ("iterations", "rounds"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"parameter {name!r} must be an int >= 1, got {getattr(self, name)!r}")

    def objective(self, cross: torch.Tensor, self_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S_cross, S_self)``, each averaged over the batch."""
        subjects = list(self.subjects)
        return subject_neglect(cross, subjects).mean(), subject_entanglement(cross, self_maps, subjects).mean()

    def optimise(self, maps, eps: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[float]]:
        """The optimisation on any ``maps(z) -> (cross [B, P, T], self_maps [B, P, P])``: returns the
        noise and the objective before each step (and after the last) of every round."""
        best, best_value, history = None, float("inf"), []
        for round_ in range(self.rounds):
            if round_:
                eps = torch.randn(eps.shape, generator=generator, dtype=eps.dtype).to(eps.device)
            mu = torch.zeros_like(eps, requires_grad=True)
            log_sigma = torch.zeros_like(eps, requires_grad=True)
            optimiser = torch.optim.Adam([mu, log_sigma], lr=self.lr)
            for i in range(self.iterations + 1):
                z = mu + torch.exp(log_sigma) * eps
                s_cross, s_self = self.objective(*maps(z))
                loss = s_cross + s_self + self.kl_weight * kl_to_prior(mu, log_sigma)
                value, valid = loss.item(), s_cross.item() < self.cross_threshold and s_self.item() < self.self_threshold
                history.append(value)
                if value < best_value:
                    best, best_value = z.detach(), value
                if i == self.iterations or valid:
                    break
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            if valid:
                break
        return best, history

    def map(self, unet, latents: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[float]]:
        """The optimised initial noise for ``latents`` (the drawn ``eps``) and the objective's
        history, from calls of ``unet(z, timestep, encoder_hidden_states)``."""
        from vlmprune.adapters.unet import UNetAdapter, unet_blocks
        from vlmprune.wrap import Handle

        blocks = self._map_blocks(unet, latents.shape[-2] * latents.shape[-1])
        handle = Handle.of(unet)
        runtime = handle.adapter.runtime if handle is not None and isinstance(handle.adapter, UNetAdapter) else None
        points = {id(b): Point(stage, l) for stage, found in unet_blocks(unet).items() for l, b in enumerate(found)}
        captured: dict[tuple[int, str], torch.Tensor] = {}
        restore = []
        for block in blocks:
            for name in ("attn1", "attn2"):
                attn = getattr(block, name)
                restore.append((attn, attn.processor))
                attn.set_processor(_eager_processor())
                attn.get_attention_scores = _recording(attn, captured, (id(block), name))

        def maps(z):
            captured.clear()
            unet(z, timestep, encoder_hidden_states=encoder_hidden_states)
            cross, selfs = [], []
            for block in blocks:
                red = runtime.reductions.get(points[id(block)]) if runtime is not None else None
                for name, out in (("attn2", cross), ("attn1", selfs)):
                    probs = captured[(id(block), name)]
                    probs = probs.view(z.shape[0], -1, *probs.shape[1:]).mean(1)  # heads averaged
                    out.append(_recovered(probs, red, columns=name == "attn1"))
            cross_map = torch.stack(cross).mean(0)[..., 1:]
            cross_map = cross_map / cross_map.sum(-1, keepdim=True)
            return torch.cat([cross_map.new_zeros(*cross_map.shape[:-1], 1), cross_map], -1), torch.stack(selfs).mean(0)

        try:
            return self.optimise(maps, latents, generator)
        finally:
            for attn, processor in restore:
                attn.set_processor(processor)
                del attn.get_attention_scores
            if handle is not None:
                handle.reset()

    def _map_blocks(self, unet, n_latent: int) -> list:
        from vlmprune.adapters.unet import stage_downsample, unet_blocks

        by_ds: dict[int, list] = {}
        for stage, found in unet_blocks(unet).items():
            by_ds.setdefault(stage_downsample(stage, len(unet.down_blocks)), []).extend(found)
        if self.map_downsample is not None:
            if self.map_downsample not in by_ds:
                raise ValueError(f"parameter 'map_downsample' must be one of {sorted(by_ds)}, got {self.map_downsample!r}")
            return by_ds[self.map_downsample]
        fitting = [d for d in sorted(by_ds) if n_latent // (d * d) <= 256]
        return by_ds[fitting[0] if fitting else max(by_ds)]


def _eager_processor() -> Any:
    """diffusers' eager attention processor, whose probabilities pass through
    ``attn.get_attention_scores``."""
    from diffusers.models.attention_processor import AttnProcessor

    return AttnProcessor()


def _recording(attn, captured: dict, key):
    original = type(attn).get_attention_scores.__get__(attn)

    def get_attention_scores(*args, **kwargs):
        probs = original(*args, **kwargs)
        captured[key] = probs
        return probs

    return get_attention_scores


def _recovered(probs: torch.Tensor, reduction, columns: bool) -> torch.Tensor:
    """``probs [B, q, k]`` over the full grid: rows of reduced queries restored by copy, and (for
    self-attention, ``columns``) each kept key's mass spread evenly over the tokens it stands for."""
    if reduction is None or probs.shape[1] == reduction.n:
        return probs
    rows = reduction.restore(probs, "copy", dim=1)
    if not columns:
        return rows
    merge_map = reduction.selection.merge_map.to(probs.device)
    counts = torch.zeros(merge_map.shape[0], probs.shape[-1], device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(1, merge_map.clamp(min=0), (merge_map >= 0).to(probs.dtype))
    return reduction.restore(rows / counts.clamp_min(1)[:, None, :], "copy", dim=2)
