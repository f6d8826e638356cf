"""The adapter for transformers' LLaVA (``LlavaForConditionalGeneration`` / ``LlavaModel``)
with any vision tower: CLIP, SigLIP (no CLS) or DINOv2.

Stages: ``encoder`` (between vision-encoder blocks), ``projector`` (on the selected vision
features, before the projector maps them) and ``llm`` (before decoder layer K in prefill).

How tokens leave (transformers 5.x checks that the number of image placeholders equals
the number of features, so features are never shortened alone): the adapter computes the
image features itself, places each image's surviving tokens (in the method's order) in the
first slots of its placeholder span, and the language model's input hook removes the
unused slots from embeddings, padding mask, position ids (and labels). Positions are
renumbered (``"compact"``, what LLaVA implementations do) unless the method asks for
``"original"``.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmprune.context import ModelInfo, Point, Signals, VLMInfo, vlm_stages
from vlmprune.method import Method
from vlmprune.stats import Stats

from .base import Adapter, Installed, Plan, llm_cost, register_adapter
from .decoder import Decoder
from .vision import (
    EncoderCapture,
    VisionTower,
    encoder_signals,
    install_capture,
    install_encoder_pruning,
)
from .vlm import ImageRecord, VLMRuntime, check_llm_attention, position_options


def _pixel_patches(pixel_values: torch.Tensor, patch: int, raster: torch.Tensor) -> torch.Tensor:
    """The ``patch x patch`` pixel block under each current token: ``[n_img, N, C, p, p]`` (pixel
    values as fed to the tower, i.e. normalised), gathered by raster index."""
    n_img, c = pixel_values.shape[:2]
    blocks = pixel_values.unfold(2, patch, patch).unfold(3, patch, patch)  # [n, C, gh, gw, p, p]
    blocks = blocks.permute(0, 2, 3, 1, 4, 5).reshape(n_img, -1, c, patch, patch)
    return blocks[torch.arange(n_img, device=raster.device)[:, None], raster]


@register_adapter
class LlavaAdapter(Adapter):
    model_types = ("llava",)
    stages = ("encoder", "projector", "llm")
    options = position_options()

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.core = model.model if hasattr(model, "language_model") is False or hasattr(model, "lm_head") else model
        if not hasattr(self.core, "vision_tower"):
            self.core = model.model
        self.tower = VisionTower(self.core.vision_tower)
        self.decoder = Decoder(self.core.language_model)
        self.config = model.config

    # -- facts -------------------------------------------------------------------------------------
    def _feature_layer(self) -> int:
        vfl = self.config.vision_feature_layer
        if not isinstance(vfl, int):
            return max(layer % (self.tower.depth + 1) for layer in vfl) - 1
        return vfl % (self.tower.depth + 1) - 1  # hidden_states[i] is the output of block i - 1

    def max_visual(self) -> int:
        """``(image_size / patch_size)**2`` from the vision config: the placeholders the LLaVA
        processor puts in the prompt at the config's image size (a DINOv2 tower's run-time count
        comes from pixel_values and is checked again at the first forward)."""
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def info(self) -> VLMInfo:
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        # DINOv2 towers interpolate their position grid: the run-time grid comes from pixel_values
        known = getattr(vc, "model_type", "") != "dinov2"
        tc = self.config.text_config
        return VLMInfo(
            family="llava",
            n_visual=side * side if known else None,
            grid=(side, side) if known else None,
            has_cls=self.tower.has_cls,
            encoder_layers=self.tower.depth,
            feature_layer=self._feature_layer(),
            llm_layers=tc.num_hidden_layers,
            stages=vlm_stages(self.stages, has_cls=self.tower.has_cls),
        )

    def cost(self, stats: Stats) -> dict:
        return llm_cost(self.decoder, self.config.text_config, stats)

    def check_plan(self, method: Method, points: list[Point]) -> None:
        check_llm_attention(self.model, method, points)

    # -- install -----------------------------------------------------------------------------------
    def make_runtime(self, plan: Plan, info: ModelInfo) -> "LlavaRuntime":
        """The per-wrap runtime whose methods the hooks call (a subclass brings its own)."""
        return LlavaRuntime(plan, info, self)

    def install(self, plan: Plan) -> Installed:
        info = self.info()
        enc_points = [p for p in plan.points if p.stage == "encoder"]
        if enc_points and not isinstance(self.config.vision_feature_layer, int):
            raise ValueError("encoder-stage pruning needs a single vision_feature_layer (this model concatenates several)")
        for p in enc_points:
            if p.layer is None or not 1 <= p.layer <= info.feature_layer:
                raise ValueError(
                    f"encoder pruning layer (point {p} of method {plan.method.name!r}) must be in "
                    f"[1, {info.feature_layer}] (the feature layer), got {p.layer}"
                )
        installed = Installed()
        rt = self.make_runtime(plan, info)
        for p in enc_points:
            install_encoder_pruning(installed, self.tower, p.layer, rt.encoder_prune)
        enc_capture = tuple(sorted({layer % self.tower.depth for layer in plan.capture.get("encoder", ())}))
        install_capture(installed, self.tower, enc_capture, lambda: rt.capture, lambda: rt.alive)
        rt.install_common(installed, self.decoder, self.core, self.model)
        self.runtime = rt
        return installed


class LlavaRuntime(VLMRuntime):
    def __init__(self, plan: Plan, info: ModelInfo, adapter: LlavaAdapter):
        super().__init__(plan, info, adapter)
        self.capture = EncoderCapture()
        self.alive: torch.Tensor | None = None  # [n_img, N_alive] raster indices in the encoder
        self.image_ids: list[int] | None = None  # the image the tower is running on, per-image mode

    # -- vision side ---------------------------------------------------------------------------------
    def image_features(
        self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, image_sizes=None, **kwargs
    ):
        adapter = self.adapter
        core, tower, cfg = adapter.core, adapter.tower, adapter.config
        vfl = cfg.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = cfg.vision_feature_select_strategy if vision_feature_select_strategy is None else vision_feature_select_strategy
        patch = cfg.vision_config.patch_size
        n_img, _, height, width = pixel_values.shape
        grid = (height // patch, width // patch)
        n = grid[0] * grid[1]
        self.begin(n, grid, pixel_values.device)
        extra_args = {"image_sizes": image_sizes} if image_sizes is not None else {}
        if self.method.encoder_per_image() and any(p.stage == "encoder" for p in self.plan.points):
            out = self._tower_per_image(pixel_values, n, extra_args)
        else:
            self.capture.clear()
            self.alive = torch.arange(n, device=pixel_values.device).expand(n_img, -1)
            self.image_ids = None
            out = core.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **extra_args)
        layers = [vfl] if isinstance(vfl, int) else list(vfl)
        off = int(tower.has_cls)
        feats = torch.cat([out.hidden_states[layer][:, off:] for layer in layers], dim=-1)
        cls_tok = torch.cat([out.hidden_states[layer][:, 0] for layer in layers], dim=-1) if off else None
        cls_slot = bool(off and strategy == "full")  # the model itself feeds CLS to the LLM
        self.slots = [n + int(cls_slot)] * n_img
        raster = self.alive
        per_image = [(feats[i], raster[i], cls_slot, None) for i in range(n_img)]
        if any(p.stage == "projector" for p in self.plan.points):
            signals = Signals(
                {
                    **encoder_signals(tower, self.capture, raster, self.info.feature_layer),
                    "hidden": lambda: feats,
                    "projected": lambda: core.multi_modal_projector(feats),
                    "projector": lambda: core.multi_modal_projector,
                    "projector_input": lambda: feats,
                    "text_embedding": self._text_embedding,
                    "pixels": lambda: _pixel_patches(pixel_values, patch, raster),
                }
            )
            red = self.run(Point("projector"), feats, raster, signals, cls_token=cls_tok)
            sel = red.selection
            if sel.keep_cls and cls_tok is None:
                raise RuntimeError(f"method {self.method.name!r} asked to keep CLS, but the tower has none")
            per_image = []
            kept, kept_raster = red.tokens(feats), red.apply(raster)
            for i, (_, merged, extra) in enumerate(sel.per_image()):
                in_llm = merged is not None and sel.merged_space == "projected"
                f, r = kept[i], kept_raster[i]
                if extra is not None:
                    f = torch.cat([f, extra.to(feats.dtype)])
                    r = torch.cat([r, r.new_full((extra.shape[0],), -1)])
                per_image.append((f, r, cls_slot or sel.keep_cls, merged if in_llm else None))
        feats_list, rasters, overrides = [], [], []
        for i, (f, r, with_cls, in_llm) in enumerate(per_image):
            if with_cls:
                f = torch.cat([cls_tok[i : i + 1], f])
                r = torch.cat([r.new_full((1,), -1), r])
            feats_list.append(f)
            rasters.append(r)
            overrides.append((int(with_cls), in_llm))
        projected = core.multi_modal_projector(torch.cat(feats_list)).split([f.shape[0] for f in feats_list])
        projected = [  # merged values given in LLM space replace the kept tokens' projections
            p if values is None else torch.cat([p[:at], values.to(p.dtype), p[at + values.shape[0] :]])
            for p, (at, values) in zip(projected, overrides)
        ]
        slots = n + int(cls_slot)
        padded = []
        for p in projected:
            if p.shape[0] > slots:
                raise RuntimeError(f"method {self.method.name!r} produced {p.shape[0]} tokens for {slots} image slots")
            padded.append(torch.cat([p, p.new_zeros(slots - p.shape[0], p.shape[1])]))
        self.images = [ImageRecord(f.shape[0], r, slots, int(cls_slot)) for f, r in zip(feats_list, rasters)]
        out.pooler_output = padded
        return out

    def _tower_per_image(self, pixel_values, n: int, extra_args: dict):
        """Run the tower one image at a time, for methods whose per-image counts differ between
        encoder layers; hidden states and captures are stacked back afterwards."""
        outs, alive, captures = [], [], []
        for i in range(pixel_values.shape[0]):
            self.capture = EncoderCapture()
            self.alive = torch.arange(n, device=pixel_values.device)[None]
            self.image_ids = [i]
            outs.append(self.adapter.core.vision_tower(pixel_values[i : i + 1], output_hidden_states=True, return_dict=True, **extra_args))
            alive.append(self.alive)
            captures.append(self.capture)
        self.image_ids = None
        lengths = {a.shape[1] for a in alive}
        if len(lengths) != 1:
            raise RuntimeError(f"method {self.method.name!r} left different token counts per image in the encoder: {sorted(lengths)}")
        self.alive = torch.cat(alive)
        merged = EncoderCapture()
        for layer in captures[0].qkv:
            parts = [c.qkv[layer] for c in captures]
            if len({p["q"].shape for p in parts}) == 1:
                merged.qkv[layer] = {k: torch.cat([p[k] for p in parts]) for k in "qkv"}
                merged.alive[layer] = torch.cat([c.alive[layer] for c in captures])
        self.capture = merged
        out = outs[0]
        out.hidden_states = tuple(
            torch.cat([o.hidden_states[j] for o in outs]) if len({o.hidden_states[j].shape for o in outs}) == 1 else None
            for j in range(len(out.hidden_states))
        )
        return out

    def encoder_prune(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        tower = self.adapter.tower
        off = int(tower.has_cls)
        patches = hidden[:, off:]
        signals = Signals({**encoder_signals(tower, self.capture, self.alive, layer - 1), "hidden": lambda: patches})
        red = self.run(
            Point("encoder", layer), patches, self.alive, signals, images=self.image_ids, cls_token=hidden[:, 0] if off else None
        )
        self.alive = red.apply(self.alive)
        return red.tokens(hidden)  # CLS (the stage's prefix) first
