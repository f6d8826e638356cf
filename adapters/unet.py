"""The diffusion-UNet adapter: diffusers' ``UNet2DConditionModel`` (Stable-Diffusion-type UNets),
matched by class name (:data:`FLAVOURS`), its transformer blocks (``BasicTransformerBlock``) found
by class name too, so nothing of diffusers is imported here.

Stages (CORE-V2 "diffusion UNet"): one per UNet block that holds transformer blocks, named
``unet.down.<i>``, ``unet.mid``, ``unet.up.<j>`` (``down_blocks[i]``, ``mid_block``,
``up_blocks[j]``), role ``inside``, ``restore="exit"``; ``Point(stage, l)`` is that block's
transformer block ``l`` (0-based, over its ``attentions[a].transformer_blocks[t]`` in order).
:attr:`UNetInfo.downsample` gives each stage's downsampling of the latent (``2 ** i`` for
``down.i``, the lowest for ``mid``, ``2 ** (levels - 1 - j)`` for ``up.j``). Boundary-role
methods (uniform, random, DivPrune) act at the first transformer block of the highest resolution.

Mechanics (hooks only, diffusers' forward is not copied). At every UNet call (one denoising step:
``ctx.step``; classifier-free guidance run as one batch of both halves, as diffusers' pipelines
do, is one step) a pre-hook reads the latent size ``H x W``. At each point, a pre-hook of the
transformer block runs the method on the block's input ``[B, N, C]`` (``ctx.tokens``; signals
``hidden`` and ``projected`` are the same tensor; ``ctx.grid`` is the block's token grid, of
``ceil(H / d) x ceil(W / d)`` tokens, ``d = ceil(sqrt(H * W // N))`` as tomesd computes it).
Each of the block's residual branches the method names (its ``branches`` attribute, default
``("attn1",)``: self-attention; ``"attn2"``: cross-attention, queries only; ``"ff"``: the MLP)
then runs on the reduced tokens and hands all ``N`` back at its exit
(:func:`.reversible.install_exit_restore`, ToMeSD's ``x = x + unmerge(branch(merge(norm(x))))``):
a kept token gets its own output, a token merged or matched into a kept one (``merge_map``) a
copy of that one's output, a dropped token (no merge map) zeros, so the residual leaves it as it
was. A selection with ``merged`` values (a merge: ToMeSD) has each branch's input averaged over
the groups of its ``merge_map`` (each branch reads another normalised tensor than the block's
input); one without (a prune: SimPrune) has it gathered at ``keep``. Self-attention's
``attention_mask``, where one is given, is reduced with its keys. Feed-forward chunking
(``set_chunk_feed_forward`` on the transformer blocks) cannot run with ``"ff"`` reduced (refused
at ``wrap()``).

Cost (``handle.stats``, :meth:`UNetAdapter.cost`): the transformer blocks' FLOPs of the last UNet
call (one denoising step), as run and unreduced, from each point's kept tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from vlmprune.context import ModelInfo, Point, Selection, Signals, StageSpec
from vlmprune.reduction import Reduction
from vlmprune.stats import Stats

from .base import Adapter, Installed, Plan, read_arg, register_adapter
from .reversible import install_exit_restore
from .runtime import Runtime

#: the classes served, matched by name over the MRO
FLAVOURS = ("UNet2DConditionModel",)
#: the transformer blocks whose branches are reduced, matched by class name
BLOCK = "BasicTransformerBlock"
#: a block's residual branches a method may reduce (attribute names), and the keyword arguments
#: aligned with each one's tokens (name -> token dimension)
BRANCHES = {"attn1": {"attention_mask": -1}, "attn2": {}, "ff": {}}
SIGNALS = ("hidden", "projected")


def _named(module: nn.Module, name: str) -> bool:
    return any(c.__name__ == name for c in type(module).__mro__)


def unet_blocks(unet: nn.Module) -> dict[str, list[nn.Module]]:
    """Stage name -> its transformer blocks in order, in the UNet's running order (down, mid, up);
    UNet blocks without any are left out."""
    groups = [(f"unet.down.{i}", b) for i, b in enumerate(unet.down_blocks)]
    groups += [("unet.mid", unet.mid_block)] if unet.mid_block is not None else []
    groups += [(f"unet.up.{j}", b) for j, b in enumerate(unet.up_blocks)]
    out = {}
    for name, block in groups:
        found = [m for m in block.modules() if _named(m, BLOCK)]
        if found:
            out[name] = found
    return out


def stage_downsample(stage: str, levels: int) -> int:
    """How many times smaller than the latent (per side) a stage's token grid is."""
    if stage == "unet.mid":
        return 2 ** (levels - 1)
    _, kind, index = stage.split(".")
    return 2 ** int(index) if kind == "down" else 2 ** (levels - 1 - int(index))


def block_grid(n: int, height: int, width: int) -> tuple[int, int]:
    """The ``(rows, cols)`` token grid of ``n`` tokens of an ``height x width`` latent, as tomesd
    derives it: downsampling ``d = ceil(sqrt(height * width // n))``, ``ceil(height / d)`` rows,
    ``ceil(width / d)`` columns."""
    d = int(math.ceil(math.sqrt(height * width // n)))
    rows, cols = int(math.ceil(height / d)), int(math.ceil(width / d))
    if rows * cols != n:
        raise RuntimeError(f"a block's {n} tokens do not form the {rows} x {cols} grid of a {height} x {width} latent")
    return rows, cols


def group_mean(x: torch.Tensor, merge_map: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, k, C]``: for each of ``k`` slots the mean of the rows of ``x [B, N, C]`` that
    ``merge_map [B, N]`` sends there (-1: none)."""
    index = merge_map.clamp(min=0).to(x.device)
    weight = (merge_map >= 0).to(x.device, x.dtype)
    sums = x.new_zeros(x.shape[0], k, x.shape[-1]).scatter_add_(1, index[..., None].expand_as(x), x * weight[..., None])
    counts = x.new_zeros(x.shape[0], k).scatter_add_(1, index, weight)
    return sums / counts[..., None]


def _linear_flops(module: nn.Module, n: int) -> float:
    return float(sum(2 * m.in_features * m.out_features * n for m in module.modules() if isinstance(m, nn.Linear)))


def attention_flops(attn: nn.Module, queries: int, keys: int) -> float:
    """FLOPs of one diffusers ``Attention`` on ``queries`` query rows and ``keys`` key rows:
    ``to_q``/``to_out`` on the queries, ``to_k``/``to_v`` on the keys, scores and mixing."""
    inner = attn.to_q.out_features
    flops = _linear_flops(attn.to_q, queries) + _linear_flops(attn.to_out, queries)
    flops += _linear_flops(attn.to_k, keys) + _linear_flops(attn.to_v, keys)
    return flops + 4.0 * queries * keys * inner


def block_flops(block: nn.Module, n: int, context: int, branches: tuple[str, ...], kept: int | None = None) -> float:
    """FLOPs of one row through a transformer block of ``n`` tokens (cross-attention over
    ``context`` text tokens), the ``branches`` named running on ``kept`` tokens."""
    def tokens(name: str) -> int:
        return kept if name in branches and kept is not None else n

    flops = attention_flops(block.attn1, tokens("attn1"), tokens("attn1"))
    if getattr(block, "attn2", None) is not None:
        flops += attention_flops(block.attn2, tokens("attn2"), context)
    return flops + _linear_flops(block.ff, tokens("ff"))


@dataclass
class UNetInfo(ModelInfo):
    """:class:`ModelInfo` of a UNet plus each stage's downsampling of the latent (per side)."""

    downsample: dict[str, int] = field(default_factory=dict)


@register_adapter
class UNetAdapter(Adapter):
    model_types = ("unet",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return any(_named(model, name) for name in FLAVOURS)

    @property
    def blocks(self) -> dict[str, list[nn.Module]]:
        return unet_blocks(self.model)

    def info(self) -> UNetInfo:
        blocks = self.blocks
        levels = len(self.model.down_blocks)
        stages = {
            name: StageSpec(name, "inside", layers=range(len(found)), signals=frozenset(SIGNALS), restore="exit")
            for name, found in blocks.items()
        }
        downsample = {name: stage_downsample(name, levels) for name in blocks}
        size = self.model.config.sample_size  # the default latent size (None: not set); each call's is read
        side = (size, size) if isinstance(size, int) else tuple(size) if size is not None else None
        first = min(blocks, key=lambda name: downsample[name]) if blocks else None
        return UNetInfo(
            family="unet",
            stages=stages,
            default_points={"boundary": Point(first, 0)} if first else {},
            grid=side,
            n_tokens=None,  # per input: the latent size is the call's
            signals=SIGNALS,
            downsample=downsample,
        )

    def max_visual(self) -> int | None:
        """None: token counts depend on each call's latent size (fractions are of each block's)."""
        return None

    def cost(self, stats: Stats) -> dict[str, Any]:
        """FLOPs (multiply-adds x 2) of the transformer blocks in the last UNet call (one denoising
        step, the whole batch, classifier-free guidance halves included), as run and unreduced: at
        each block the linear layers of self-attention, cross-attention and the MLP, and the
        attention scores and mixing, on the tokens each branch ran on (a point's kept tokens for the
        branches the method reduces). Not counted: convolutions, norms, the methods' own matching
        and restoring (the part of a step merging does not change or adds). Nothing before the
        first call."""
        rt = getattr(self, "runtime", None)
        if rt is None or rt.latent is None:
            return {}
        kept = {p["point"]: p["out"] for p in stats.points}
        branches = tuple(getattr(rt.plan.method, "branches", ("attn1",)))
        info = self.info()
        full = run = 0.0
        for stage, found in self.blocks.items():
            d = info.downsample[stage]
            n = math.ceil(rt.latent[0] / d) * math.ceil(rt.latent[1] / d)
            for layer, block in enumerate(found):
                rows = kept.get(str(Point(stage, layer)), [n] * rt.batch)
                for k in rows:
                    full += block_flops(block, n, rt.text_tokens, ())
                    run += block_flops(block, n, rt.text_tokens, branches, k)
        return {"transformer_flops": run, "transformer_flops_unpruned": full, "flops_saved": full - run}

    def install(self, plan: Plan) -> Installed:
        branches = tuple(getattr(plan.method, "branches", ("attn1",)))
        unknown = [b for b in branches if b not in BRANCHES]
        if unknown or not branches:
            raise ValueError(f"method {plan.method.name!r} names branches {list(branches)}; valid choices: {list(BRANCHES)}")
        blocks = self.blocks
        if "ff" in branches and any(getattr(blocks[p.stage][p.layer], "_chunk_size", None) for p in plan.points):
            raise ValueError(
                f"method {plan.method.name!r} reduces the feed-forward branch, which this UNet runs in chunks "
                "(a transformer block's set_chunk_feed_forward): set the chunk size to None or leave merge_mlp off"
            )
        installed = Installed()
        rt = UNetRuntime(plan, self.info())
        installed.hook(self.model.register_forward_pre_hook(rt.start, with_kwargs=True))
        for point in plan.points:
            block = blocks[point.stage][point.layer]
            installed.hook(block.register_forward_pre_hook(rt.enter_hook(point), with_kwargs=True))
            for name in branches:
                branch = getattr(block, name, None)
                if branch is not None:
                    install_exit_restore(installed, branch, rt.branch_reduction(point), aligned=BRANCHES[name])
        self.runtime = rt
        return installed


class UNetRuntime(Runtime):
    """The hooks' shared state: the latent size of the current call and the reduction made at
    each point of it."""

    def __init__(self, plan: Plan, info: ModelInfo):
        super().__init__(plan, info)
        self.latent: tuple[int, int] | None = None  # set by each call's pre-hook
        self.batch = 0  # rows of the call
        self.text_tokens = 0  # text tokens of its encoder_hidden_states (cross-attention keys)
        self.reductions: dict[Point, Reduction] = {}

    def start(self, module, args, kwargs) -> None:
        """UNet pre-hook: a new denoising step on this latent."""
        sample = read_arg(args, kwargs, "sample", 0)
        self.latent = (sample.shape[-2], sample.shape[-1])
        self.batch = sample.shape[0]
        context = read_arg(args, kwargs, "encoder_hidden_states", 2)
        self.text_tokens = context.shape[1] if context is not None else 0
        self.begin(self.latent[0] * self.latent[1], self.latent, sample.device)
        self.reductions = {}

    def enter_hook(self, point: Point):
        def hook(module, args, kwargs):
            x = read_arg(args, kwargs, "hidden_states", 0)
            self.reductions[point] = self.reduce(point, x)

        return hook

    def reduce(self, point: Point, x: torch.Tensor) -> Reduction:
        """Run the method at ``point`` on a block's input ``x [B, N, C]``."""
        b, n, _ = x.shape
        self.grid = block_grid(n, *self.latent)
        self.n_visual = n
        signals = Signals({"hidden": lambda: x, "projected": lambda: x})
        index = torch.arange(n, device=x.device).expand(b, -1)
        return self.run(point, x, index, signals)

    def branch_reduction(self, point: Point):
        """What :func:`.reversible.install_exit_restore` applies to a branch of the block at
        ``point``: the block's reduction, with the branch input's group means as merged values
        when the selection merges."""

        def reduction_for(x: torch.Tensor) -> Reduction:
            red = self.reductions[point]
            sel: Selection = red.selection
            if sel.merged is None or sel.merge_map is None:
                return red
            merged = group_mean(x, sel.merge_map, sel.keep.shape[1])
            return Reduction(replace(sel, merged=merged), red.n, red.prefix, ctx=red.ctx)

        return reduction_for
