"""ToMeSD: token merging for Stable Diffusion (arXiv 2303.17604), inside a UNet's transformer
blocks at every denoising step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..context import ModelInfo, Point, Selection, TokenContext
from ..method import Method, option
from ..primitives.merging import bipartite_soft_matching
from ..primitives.stride_partition import stride_partition
from ..registry import register


def check_ratio(value: Any, where: str) -> None:
    """A ratio of tokens removed: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{where} must be a number in [0, 1) (fraction of tokens removed), got {value!r}")


def ratio_at(ratio: Any, point: Point, step: int, where: str) -> float:
    """The ratio at ``point`` and denoising step ``step`` of a ``ratio`` option: a number (every
    block, every step), a dict naming blocks (a stage, e.g. ``"unet.down.0"``, or a point,
    ``"unet.up.1:2"``; the point's entry wins; a block it does not name: 0) or a function of the
    step returning either (None: 0.5, tomesd's default)."""
    if ratio is None:
        return 0.5
    if callable(ratio):
        ratio = ratio(step)
        where = f"{where} at step {step}"
    if isinstance(ratio, dict):
        ratio = ratio.get(str(point), ratio.get(point.stage, 0.0))
    check_ratio(ratio, where)
    return float(ratio)


def check_ratio_option(ratio: Any, info: ModelInfo, where: str) -> None:
    """Refuse a ``ratio`` option that names no block of this model or holds a bad value (a
    function of the step is checked at step 0)."""
    value = ratio(0) if callable(ratio) else ratio
    if value is None:
        return
    if isinstance(value, dict):
        valid = {str(Point(s, l)) for s, spec in info.stages.items() for l in spec.layers} | set(info.stages)
        unknown = sorted(set(map(str, value)) - valid)
        if unknown:
            raise ValueError(f"{where} names blocks {unknown}; valid choices: stages {list(info.stages)} or points 'stage:layer'")
        for v in value.values():
            check_ratio(v, where)
    else:
        check_ratio(value, where)


@dataclass
class StrideMatching(Method):
    """The options and points that ToMeSD and SimPrune (OptiPrune) share: a UNet's transformer
    blocks at most ``max_downsample`` times smaller than the latent, one destination per
    ``sy x sx`` window, every other token matched to its most similar destination (cosine of the
    block's input), ``int(N * ratio)`` of the best matched removed; the branches named by
    ``merge_attn``, ``merge_crossattn``, ``merge_mlp`` run on the rest (the UNet adapter)."""

    stages = ()
    roles = ("inside",)
    needs = frozenset({"hidden"})
    uses_budget = False

    ratio: Any = option(None, "fraction of each block's tokens removed: a number in [0, 1), a dict of blocks "
                              "({'unet.down.0': 0.5, 'unet.up.1:2': 0.3}; others 0) or a function of the denoising "
                              "step returning either; None: 0.5 (tomesd's apply_patch default)")
    sx: int = option(2, "window width of the destination partition (tomesd default)")
    sy: int = option(2, "window height of the destination partition (tomesd default)")
    use_rand: bool = option(True, "a random destination in each window (tomesd default); False: the top-left one")
    max_downsample: int = option(1, "act in blocks at most this many times smaller than the latent: 1, 2, 4 or 8 "
                                    "(tomesd default 1: the highest-resolution blocks only)")
    merge_attn: bool = option(True, "reduce the tokens of self-attention (tomesd default)")
    merge_crossattn: bool = option(False, "reduce the queries of cross-attention (tomesd default: off)")
    merge_mlp: bool = option(False, "reduce the tokens of the MLP (tomesd default: off)")

    def __post_init__(self):
        super().__post_init__()
        if self.ratio is not None and not callable(self.ratio) and not isinstance(self.ratio, dict):
            check_ratio(self.ratio, f"option 'ratio' of method {self.name!r}")
        for name in ("sx", "sy", "max_downsample"):
            if getattr(self, name) < 1:
                raise ValueError(f"option {name!r} of method {self.name!r} must be >= 1, got {getattr(self, name)}")
        if not self.branches:
            raise ValueError(f"method {self.name!r}: at least one of merge_attn, merge_crossattn, merge_mlp must be True")

    @property
    def branches(self) -> tuple[str, ...]:
        """The transformer block's branches the UNet adapter runs on the reduced tokens."""
        flags = (("attn1", self.merge_attn), ("attn2", self.merge_crossattn), ("ff", self.merge_mlp))
        return tuple(name for name, on in flags if on)

    def points(self, info: ModelInfo) -> list[Point]:
        """Every transformer block of the stages at most ``max_downsample`` smaller than the
        latent (and, for a dict ``ratio``, named in it), in running order."""
        downsample = getattr(info, "downsample", None)
        if downsample is None:
            raise ValueError(
                f"method {self.name!r} merges inside the transformer blocks of a diffusion UNet; the {info.family} "
                f"adapter offers no UNet stages (it offers {list(info.stages)})"
            )
        check_ratio_option(self.ratio, info, f"option 'ratio' of method {self.name!r}")
        named = set(map(str, self.ratio)) if isinstance(self.ratio, dict) else None
        out = []
        for stage, spec in info.stages.items():
            if downsample[stage] > self.max_downsample:
                continue
            out += [Point(stage, l) for l in spec.layers if named is None or stage in named or str(Point(stage, l)) in named]
        if not out:
            raise ValueError(
                f"option 'max_downsample' of method {self.name!r} (with 'ratio') leaves no transformer block to act in: "
                f"this UNet's blocks are {dict(downsample)} times smaller than the latent"
            )
        return out

    def partition(self, ctx: TokenContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(sources, destinations) on ``ctx.grid``; a random one from the session's generator
        (made from ``seed`` at the session's first draw, kept across denoising steps until
        ``handle.reset()``, one draw per block call shared by the batch's rows)."""
        h, w = ctx.grid
        generator = self.generator(ctx) if self.randomised(ctx) else None
        return stride_partition(h, w, self.sx, self.sy, generator, ctx.tokens.device)

    def randomised(self, ctx: TokenContext) -> bool:
        return self.use_rand

    def generator(self, ctx: TokenContext) -> torch.Generator:
        gen = ctx.state.session.get(self.name + ".generator")
        if gen is None or gen.device != ctx.tokens.device:
            gen = torch.Generator(device=ctx.tokens.device).manual_seed(self.seed)
            ctx.state.session[self.name + ".generator"] = gen
        return gen

    def removed(self, ctx: TokenContext) -> int:
        return int(ctx.n * ratio_at(self.ratio, ctx.point, ctx.step, f"option 'ratio' of method {self.name!r}"))

    def match(self, ctx: TokenContext) -> tuple[Callable, torch.Tensor, torch.Tensor]:
        """ToMe's matching (:func:`bipartite_soft_matching`) on the block input over the stride
        partition: ``(merge, provenance, keep)``, ``keep`` = ``[unmatched sources by descending
        best score, destinations]``."""
        return bipartite_soft_matching(ctx.tokens, self.removed(ctx), sort_unmerged=False, sets=self.partition(ctx))


@register
@dataclass
class ToMeSD(StrideMatching):
    """ToMeSD (Bolya & Hoffman, CVPR-W 2023, arXiv 2303.17604; the ``tomesd`` package 0.1.3,
    code read): in each transformer block at most ``max_downsample`` times smaller than the
    latent, at every denoising step, the block's input is the metric; one destination per
    ``sy x sx`` window (random with ``use_rand``, forced off for an odd batch as tomesd does, so
    the cond/uncond halves of a guidance batch share one partition), every other token a source;
    each source's most cosine-similar destination is its match and the ``int(N * ratio)``
    best-matched sources are merged into their destinations (unweighted means); the branches the
    ``merge_*`` options name run on ``[unmerged sources, destinations]`` and every token gets its
    slot's output back (a merged source its destination's). Options and defaults are tomesd's
    ``apply_patch``'s; ``ratio`` also takes per-block dicts and functions of the step. tomesd
    forks the global RNG at its first merge; here the generator is made from ``seed``: the two
    draw alike after ``torch.manual_seed(seed)``. Means of groups of three or more tokens may
    differ from tomesd's in the last bit (summation order).
    No budget: ``ratio`` sets the reduction (``wrap(unet, "tomesd", ratio=0.5)``)."""

    name = "tomesd"
    paper = {"title": "Token Merging for Fast Stable Diffusion", "arxiv": "2303.17604"}

    def randomised(self, ctx: TokenContext) -> bool:
        return self.use_rand and ctx.tokens.shape[0] % 2 == 0

    def select(self, ctx: TokenContext) -> Selection:
        merge, provenance, keep = self.match(ctx)
        merged, _ = merge(ctx.tokens)
        return Selection(keep=keep, merged=merged, merge_map=provenance)
