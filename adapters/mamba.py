"""The vision-Mamba adapter: :class:`vlmprune.embedded.vim_model.VimClassifier` (Vim with a class
token anywhere in the sequence, ``mambapy.vim.VMamba`` blocks), matched by class (:data:`FLAVOURS`).

One stage, ``mixer``, between blocks and ``ordered`` (:class:`~vlmprune.context.StageSpec`): a
point at layer ``l`` (1..depth) removes patch tokens before block ``l`` runs (``l = depth``: after
the last block, before the final norm), and the tokens left stay in scan order, because each block
scans them in sequence order: a selection whose keep does not ascend is refused. ``ctx.tokens``
are the patches only. The class token is never pruned and sits wherever the model put it (Vim: the
middle); as tokens leave, each row's class token keeps its place among the patches it sat between
(``cls_place="stay"``) or is put back at the middle of the kept patches, ``k // 2`` of them before
it (``"middle"``: ToP-ViM's re-centring). Its position is tracked per row (rows with different kept
sets may hold it at different places) and handed to the model's :class:`ClassTokenPool`. None: the
method's ``cls_place`` attribute (ToP-ViM: ``"middle"``), else ``"stay"``.

Methods acting at the boundary role (uniform, random, DivPrune) act at ``Point("mixer", L)``, ``L``
the adapter option ``boundary_layer`` (default ``depth // 2``: half the blocks run on the kept
tokens; after the last block nothing reads the patches, so pruning there would change no logit).

Adapter option ``alignment`` (ToP-ViM's "pruning-aware hidden state alignment" is in no released
code; these are readings of it [unverified]): ``"none"`` (default, the released code) or
``"gap_decay"``: each scan after a point discretises the step into a kept token as
``exp(g * dt * A)`` instead of ``exp(dt * A)``, ``g`` the distance between it and the token before it
in the scan in the original sequence (1 where nothing was removed between them), so the state
decays over the removed stretch as if input-free tokens with that ``dt`` had been scanned there
(:func:`gap_selective_scan`; the class token counts at its original position). ``"state_carry"``
(removed tokens scanned as input-free transitions with their own ``dt``) is not offered.

Signals at a point ``l``: ``hidden`` and ``projected`` (the patches; no projector), ``cls_position``
(``[B]``, each row's class-token index in the current sequence) and ``mixer_backward``: block
``l - 1``'s backward-branch gated output ``y_b * SiLU(z_b)`` (``[B, L, d_inner]`` over the whole
current sequence, class token included, in the *flipped* order the backward scan runs in), read by
wrapping that mixer's ``ssm`` method for the wrap's lifetime (mambapy's forward is not copied);
``sizes`` (``[B, n]``): how many input patches each patch stands for after earlier merges.

Merges (ToMe's ``Selection.merged``, ``merge_map``) apply in place: a merged token takes its kept
token's slot in the scan (the keep ascends), and the sizes accumulate over the points.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmprune.context import ModelInfo, Point, Signals, StageSpec
from vlmprune.method import Method

from .base import Adapter, AdapterOption, Installed, Plan, read_arg, register_adapter
from .runtime import Runtime

SIGNALS = ("hidden", "projected", "cls_position", "mixer_backward", "sizes")
#: ``cls=True``: the model has a class token, though not as a prefix (it sits mid-sequence, outside
#: ``ctx.tokens``), so methods that need one are refused for the signals they lack, not for its absence
STAGE = StageSpec("mixer", "inside", signals=frozenset(SIGNALS), ordered=True, cls=True)
CLS_PLACES = ("stay", "middle")
ALIGNMENTS = ("none", "gap_decay", "state_carry")

OPTIONS = {
    "boundary_layer": AdapterOption(
        choices=(),
        doc="the layer L (an int, 1..depth) of the boundary point Point('mixer', L) where boundary methods act; "
        "None: depth // 2",
    ),
    "alignment": AdapterOption(
        choices=ALIGNMENTS,
        offered=("none", "gap_decay"),
        doc="how the scans after a point see the removed stretches: 'none' (released code) or 'gap_decay' "
        "(decay over each gap as over input-free tokens) [unverified readings of ToP-ViM's alignment]",
    ),
    "cls_place": AdapterOption(
        choices=CLS_PLACES,
        doc="where the class token goes as patches leave: 'stay' (between the same patches) or 'middle' "
        "(after k // 2 of the k kept patches); None: the method's cls_place, else 'stay'",
    ),
}

#: the classes served (matched over the MRO by name, so nothing is imported to match)
FLAVOURS = ("vlmprune.embedded.vim_model.VimClassifier",)


@dataclass
class VimInfo(ModelInfo):
    """:class:`ModelInfo` of a Vim plus its depth (``encoder_layers``, the blocks)."""

    encoder_layers: int = 0


@register_adapter
class VimAdapter(Adapter):
    model_types = ("vim",)
    stages = ("mixer",)
    options = OPTIONS

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return bool({f"{c.__module__}.{c.__qualname__}" for c in type(model).__mro__} & set(FLAVOURS))

    @property
    def depth(self) -> int:
        return len(self.model.backbone.layers)

    def boundary_layer(self, value: Any = None) -> int:
        """The boundary point's layer: ``value`` checked (an int in 1..depth), None: depth // 2."""
        if value is None:
            return max(1, self.depth // 2)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= self.depth:
            raise ValueError(f"parameter 'boundary_layer' must be an int in [1, {self.depth}] or None, got {value!r}")
        return value

    def info(self, boundary_layer: int | None = None) -> VimInfo:
        if boundary_layer is None:
            boundary_layer = self.given.get("boundary_layer")
        config = self.model.config
        side = config.image_size // config.patch_size
        stage = replace(STAGE, layers=range(1, self.depth + 1))
        return VimInfo(
            family="vim",
            stages={stage.name: stage},
            default_points={"boundary": Point(stage.name, self.boundary_layer(boundary_layer))},
            grid=(side, side),
            n_tokens=side * side,
            signals=SIGNALS,
            encoder_layers=self.depth,
        )

    def check_options(self, values: dict[str, Any], method: Method, points: list[Point]) -> dict[str, Any]:
        layer = values.get("boundary_layer")
        if layer is not None:
            self.boundary_layer(layer)
        checked = super().check_options({k: v for k, v in values.items() if k != "boundary_layer"}, method, points)
        return {**checked, "boundary_layer": layer}

    def install(self, plan: Plan) -> Installed:
        info = self.info(plan.adapter_options.get("boundary_layer"))
        place = plan.adapter_options.get("cls_place") or getattr(plan.method, "cls_place", None) or "stay"
        if place not in CLS_PLACES:
            raise ValueError(f"method {plan.method.name!r} has cls_place {place!r}; valid choices: {list(CLS_PLACES)}")
        installed = Installed()
        rt = VimRuntime(plan, info, self, place)
        model = self.model
        installed.hook(model.patch_embed.register_forward_pre_hook(rt.start))
        layers = model.backbone.layers
        for point in plan.points:
            target = layers[point.layer] if point.layer < self.depth else model.norm_f
            installed.hook(target.register_forward_pre_hook(rt.pre_hook(point.layer)))
        installed.hook(model.pool.register_forward_pre_hook(rt.pool))
        captured = {p.layer - 1 for p in plan.points} if "mixer_backward" in plan.method.needs else set()
        aligned = set(range(min(p.layer for p in plan.points), self.depth)) if rt.alignment == "gap_decay" else set()
        for block in sorted(captured | aligned):
            mixer = layers[block].mixer
            installed.set_attribute(mixer, "ssm", _wrapped_ssm(mixer, block, rt, block in captured))
            if block in aligned:
                installed.set_attribute(mixer, "selective_scan", rt.gap_scan)
        self.runtime = rt
        return installed


def _wrapped_ssm(mixer: nn.Module, block: int, rt: VimRuntime, capture: bool):
    """``mixer.ssm`` that tells ``rt`` which branch is scanning (``rt.branch``: mambapy calls
    ``ssm`` once per branch; the backward one reads ``x_proj_b``) and, with ``capture``, stores the
    backward branch's gated output ``y_b * SiLU(z_b)`` of ``block`` in ``rt.backward``."""
    original = mixer.ssm

    def ssm(*args, **kwargs):
        backward = read_arg(args, kwargs, "x_proj", 3) is mixer.x_proj_b
        rt.branch = "backward" if backward else "forward"
        y = original(*args, **kwargs)
        if capture and backward:
            rt.backward[block] = y * F.silu(read_arg(args, kwargs, "z", 1))
        return y

    return ssm


def gap_selective_scan(x, delta, A, B, C, D, gap: torch.Tensor) -> torch.Tensor:
    """mambapy's selective scan (``x, delta [B, L, ED]``, ``A [ED, N]``, ``B, C [B, L, N]``,
    ``D [ED]``) with the step into token ``t`` decaying the state by ``exp(gap[:, t] * delta * A)``
    (``gap [B, L]``; all ones: the plain scan): the state reaching ``t`` is the one a scan would
    reach after ``gap - 1`` input-free tokens with ``t``'s ``delta`` before ``t``."""
    from mambapy.pscan import pscan

    decay = torch.exp(gap[..., None, None] * delta.unsqueeze(-1) * A)
    inputs = delta.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)
    hs = pscan(decay, inputs)
    return (hs @ C.unsqueeze(-1)).squeeze(3) + D * x


class VimRuntime(Runtime):
    """The hooks' shared state: raster indices of the patches alive, each row's class-token index,
    the captured backward-branch outputs (block -> tensor)."""

    def __init__(self, plan: Plan, info: ModelInfo, adapter: VimAdapter, place: str):
        super().__init__(plan, info)
        self.adapter = adapter
        self.place = place
        self.alignment = plan.adapter_options.get("alignment") or "none"
        self.alive: torch.Tensor | None = None  # [B, n]
        self.cls_pos: torch.Tensor | None = None  # [B]
        self.origin: torch.Tensor | None = None  # [B, n + 1]: each token's position in the input sequence
        self.sizes: torch.Tensor | None = None  # [B, n]; None: one each (nothing merged yet)
        self.backward: dict[int, torch.Tensor] = {}
        self.branch = "forward"

    def gaps(self) -> torch.Tensor:
        """``[B, L]``: each token's distance in the input sequence from the token before it in the
        current branch's scan order (1 for the first)."""
        origin = self.origin if self.branch == "forward" else self.origin.flip(1)
        steps = (origin[:, 1:] - origin[:, :-1]).abs().clamp(min=1)
        return torch.cat([torch.ones_like(origin[:, :1]), steps], 1).float()

    def gap_scan(self, x, delta, A, B, C, D):
        """``mixer.selective_scan`` under ``alignment="gap_decay"`` (:func:`gap_selective_scan`)."""
        return gap_selective_scan(x, delta, A, B, C, D, self.gaps().to(x.device))

    def start(self, module, args) -> None:
        """Pre-hook of the patch embedding: a new forward on these pixels' grid."""
        pixels = args[0]
        p = self.adapter.model.config.patch_size
        grid = (pixels.shape[-2] // p, pixels.shape[-1] // p)
        n = grid[0] * grid[1]
        self.begin(n, grid, pixels.device)
        self.backward = {}
        self.sizes = None
        self.alive = torch.arange(n, device=pixels.device).expand(pixels.shape[0], -1)
        self.cls_pos = torch.full((pixels.shape[0],), self.adapter.model.cls_index, dtype=torch.long, device=pixels.device)
        self.origin = torch.arange(n + 1, device=pixels.device).expand(pixels.shape[0], -1)

    def pre_hook(self, layer: int):
        def hook(module, args):
            return (self.prune(layer, args[0]), *args[1:])

        return hook

    def pool(self, module, args):
        """Pre-hook of the model's class-token pool: each row's current class-token index."""
        return (args[0], self.cls_pos)

    def prune(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Run the method at ``Point("mixer", layer)`` on the patches of ``x [B, n + 1, D]``;
        returns the class token and the kept patches in scan order ``[B, k + 1, D]``."""
        b, length, _ = x.shape
        positions = torch.arange(length, device=x.device).expand(b, -1)
        patch_pos = positions[positions != self.cls_pos[:, None]].view(b, length - 1)
        patches = x.gather(1, patch_pos[..., None].expand(-1, -1, x.shape[-1]))
        origin = self.origin.gather(1, patch_pos)
        cls_pos = self.cls_pos
        signals = Signals(
            {
                "hidden": lambda: patches,
                "projected": lambda: patches,
                "cls_position": lambda: cls_pos,
                "mixer_backward": lambda: self.backward[layer - 1],
                "sizes": lambda: self.sizes if self.sizes is not None else patches.new_ones(patches.shape[:2]),
            }
        )
        rows = torch.arange(b, device=x.device)
        reduction = self.run(Point("mixer", layer), patches, self.alive, signals, cls_token=x[rows, cls_pos], sizes=self.sizes)
        keep = reduction.keep  # ascending: check_selection holds ordered stages to it
        kept = reduction.tokens(patches)
        k = kept.shape[1]
        new_cls = (keep < cls_pos[:, None]).sum(1) if self.place == "stay" else torch.full_like(cls_pos, k // 2)
        slots = torch.arange(k, device=x.device).expand(b, -1)
        slots = slots + (slots >= new_cls[:, None]).long()
        out = x.new_empty(b, k + 1, x.shape[-1])
        out.scatter_(1, slots[..., None].expand(-1, -1, x.shape[-1]), kept)
        out[rows, new_cls] = x[rows, cls_pos]
        new_origin = self.origin.new_empty(b, k + 1)
        new_origin.scatter_(1, slots, reduction.apply(origin))
        new_origin[rows, new_cls] = self.origin[rows, cls_pos]
        self.origin = new_origin
        self.alive = reduction.apply(self.alive)
        if self.sizes is not None or reduction.selection.merge_map is not None:
            self.sizes = reduction.sizes
        self.cls_pos = new_cls
        return out
