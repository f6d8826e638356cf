"""The plain-ViT adapter (skeleton): transformers' ``ViTModel`` and ``ViTForImageClassification``
(model_type ``"vit"``), the proof that a family which is not a VLM needs no edit of the core or
of a method.

One stage, ``vit``: a point at layer ``l`` (1..depth) removes patch tokens before block ``l``
runs; ``l = depth`` means after the last block, before the final layernorm. The prefix (the
CLS token) is never pruned, so ``Selection.keep_cls`` changes nothing here. Methods that act at
the boundary role (DivPrune, uniform, random, VisionZip) act at ``Point("vit", L)``, ``L`` being
the adapter option ``boundary_layer`` (default: depth). Tokens leave by shortening the hidden
states in a pre-hook of block ``L`` (of the final layernorm at ``L = depth``), so
``last_hidden_state`` holds the CLS token and the kept patches, and the classifier (CLS pooling)
reads the pruned sequence. Signals at a point: ``hidden`` (the patch tokens), ``projected`` (the
same tokens: a ViT has no projector), and ``cls_attention`` / ``encoder_qkv`` /
``encoder_attention`` of block ``l - 1``, captured through the tower's anatomy
(:mod:`.vision`). An encoder attention mask given to the model is refused while pruning.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from vlmprune.context import ModelInfo, Point, Signals, StageSpec
from vlmprune.method import Method

from .base import Adapter, AdapterOption, Installed, Plan, read_arg, register_adapter
from .runtime import Runtime
from .vision import (
    EncoderCapture,
    VisionTower,
    encoder_signals,
    install_capture,
    install_encoder_pruning,
)

#: what a ``vit`` point offers: the tokens, ``projected`` as the identity (no projector on a ViT),
#: and the attention signals of the block before the point
SIGNALS = ("hidden", "projected", "cls_attention", "encoder_qkv", "encoder_attention")

#: the one stage; ``layers`` (1..depth) and ``prefix`` (the tower's, the CLS token) are set per model
STAGE = StageSpec("vit", "inside", signals=frozenset(SIGNALS))

OPTIONS = {
    "boundary_layer": AdapterOption(
        choices=(),
        doc="the layer L (an int, 1..depth) of the boundary point Point('vit', L) where boundary methods act; "
        "None: depth, after the last block, the tokens the classifier's CLS pooling reads (the counterpart of "
        "a VLM's projector input)",
    )
}


@dataclass
class ViTInfo(ModelInfo):
    """:class:`ModelInfo` of a plain ViT plus the tower facts that boundary methods written for
    VLMs read: ``feature_layer``, the block whose output the boundary point receives (``L - 1``;
    VisionZip takes its CLS attention there, as at a VLM's feature layer), ``has_cls`` and
    ``encoder_layers`` (the blocks; HiPrune, HoloV and FoPru place their attention layers by it)."""

    feature_layer: int = 0
    has_cls: bool = True
    encoder_layers: int = 0


@register_adapter
class ViTAdapter(Adapter):
    model_types = ("vit",)
    stages = ("vit",)
    options = OPTIONS

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.vit = getattr(model, "vit", model)
        self.tower = VisionTower(self.vit)
        self.config = model.config

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """``ViTModel`` and ``ViTForImageClassification`` only: other ``vit`` heads (masked image
        modelling) read every patch back."""
        from transformers import ViTForImageClassification, ViTModel

        return super().matches(model) and isinstance(model, (ViTModel, ViTForImageClassification))

    def boundary_layer(self, value: Any = None) -> int:
        """The boundary point's layer: ``value`` checked (an int in 1..depth), None: depth."""
        depth = self.tower.depth
        if value is None:
            return depth
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= depth:
            raise ValueError(f"parameter 'boundary_layer' must be an int in [1, {depth}] or None, got {value!r}")
        return value

    def info(self, boundary_layer: int | None = None) -> ViTInfo:
        """The model's facts with the boundary at ``boundary_layer`` (None: the value ``wrap()``
        gave, else depth); grid and count from the config's image and patch size (another image
        size with ``interpolate_pos_encoding`` is read from the pixels at run time)."""
        if boundary_layer is None:
            boundary_layer = self.given.get("boundary_layer")
        layer = self.boundary_layer(boundary_layer)
        side = self.config.image_size // self.config.patch_size
        stage = replace(STAGE, layers=range(1, self.tower.depth + 1), prefix=self.tower.prefix)
        return ViTInfo(
            family="vit",
            stages={stage.name: stage},
            default_points={"boundary": Point(stage.name, layer)},
            grid=(side, side),
            n_tokens=side * side,
            signals=SIGNALS,
            feature_layer=layer - 1,
            has_cls=self.tower.has_cls,
            encoder_layers=self.tower.depth,
        )

    def check_options(self, values: dict[str, Any], method: Method, points: list[Point]) -> dict[str, Any]:
        value = values.get("boundary_layer")
        if value is not None:
            self.boundary_layer(value)
        return {"boundary_layer": value}

    def captured_blocks(self, plan: Plan) -> tuple[int, ...]:
        """The blocks whose q/k/v the method reads: its ``capture_layers`` under this stage's name
        and under ``"encoder"`` (the vision tower, as methods written for VLMs name it), each of
        which must have run at the method's last point (before block ``L`` blocks ``0..L-1`` have)."""
        blocks = sorted(set(plan.capture.get("vit", ())) | set(plan.capture.get("encoder", ())))
        last = max(p.layer for p in plan.points)
        late = [b for b in blocks if not 0 <= b < last]
        if late:
            raise ValueError(
                f"method {plan.method.name!r} reads the attention of block(s) {late}, which have not run at its point "
                f"vit:{last} (blocks 0..{last - 1} have); on a ViT its signals come from a block after the tokens it prunes"
            )
        return tuple(blocks)

    def install(self, plan: Plan) -> Installed:
        info = self.info(plan.adapter_options.get("boundary_layer"))
        blocks = self.captured_blocks(plan)  # refused before any hook is installed
        installed = Installed()
        rt = ViTRuntime(plan, info, self)
        installed.hook(self.vit.embeddings.register_forward_pre_hook(rt.start, with_kwargs=True))
        for point in plan.points:
            install_encoder_pruning(installed, self.tower, point.layer, rt.prune)
        install_capture(installed, self.tower, blocks, lambda: rt.capture, lambda: rt.alive)
        self.runtime = rt
        return installed


class ViTRuntime(Runtime):
    """The hooks' shared state: the capture store and the raster indices of the patches alive."""

    def __init__(self, plan: Plan, info: ModelInfo, adapter: ViTAdapter):
        super().__init__(plan, info)
        self.adapter = adapter
        self.capture = EncoderCapture()
        self.alive: torch.Tensor | None = None  # [B, N_alive]

    def start(self, module, args, kwargs) -> None:
        """Pre-hook of the embeddings: a new forward on the grid of these pixels."""
        pixels = read_arg(args, kwargs, "pixel_values", 0)
        patch = self.adapter.config.patch_size
        grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
        n = grid[0] * grid[1]
        self.begin(n, grid, pixels.device)
        self.capture = EncoderCapture()
        self.alive = torch.arange(n, device=pixels.device).expand(pixels.shape[0], -1)

    def prune(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run the method at ``Point("vit", layer)`` on the patches of ``hidden`` (prefix first);
        returns the prefix and the kept (or merged) patches."""
        tower = self.adapter.tower
        patches = hidden[:, tower.prefix :]
        signals = Signals(
            {
                **encoder_signals(tower, self.capture, self.alive, layer - 1),
                "hidden": lambda: patches,
                "projected": lambda: patches,
            }
        )
        cls_token = hidden[:, 0] if tower.has_cls else None
        reduction = self.run(Point("vit", layer), patches, self.alive, signals, cls_token=cls_token)
        self.alive = reduction.apply(self.alive)
        return reduction.tokens(hidden)
