"""The adapter for transformers' Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``).

Stages: ``projector`` (on the merger's output: each token is one 2x2 group of patches,
already in LLM space, in raster order of the merged grid) and ``llm``. Images of different
sizes have different token counts: the method is called once per group of images with the
same merged grid. The vision encoder packs all images into one sequence (and 2.5-VL uses
window attention), so encoder-stage pruning is not offered here; methods that need the
vision encoder's attention (CLS or otherwise) get a clear error at ``wrap()``.

Positions: Qwen's 3-D M-RoPE positions are computed by transformers from the *full* prompt
(``mm_token_type_ids`` required) and the adapter gathers them for the kept tokens, so every
kept token keeps its own (t, h, w) position and text after the image keeps its position.
Decode steps therefore continue at the original positions and the model's cached
``rope_deltas`` stays valid unchanged ("original" positions for every method here).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmprune.context import ModelInfo, Point, Signals
from vlmprune.stats import LLMShape

from .base import Adapter, Installed, Plan, check_selection, llm_shape, register_adapter
from .llm import Decoder
from .vlm import VLMRuntime

SIGNALS = ("hidden", "projected", "text_embedding", "text_attention", "llm_qkv", "sublayer_io")


@register_adapter
class QwenVLAdapter(Adapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    stages = ("projector", "llm")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.core = model.model if hasattr(model, "lm_head") else model
        self.decoder = Decoder(self.core.language_model)
        self.config = model.config

    def info(self) -> ModelInfo:
        vc, tc = self.config.vision_config, self.config.text_config
        depth = vc.depth
        return ModelInfo(
            family=self.config.model_type,
            n_visual=None,  # depends on each image's size
            grid=None,
            has_cls=False,
            encoder_layers=depth,
            feature_layer=depth - 1,
            llm_layers=tc.num_hidden_layers,
            stages=self.stages,
            signals=SIGNALS,
        )

    def llm_shape(self) -> LLMShape:
        return llm_shape(self.decoder, self.config.text_config)

    def install(self, plan: Plan) -> Installed:
        info = self.info()
        installed = Installed()
        rt = QwenRuntime(plan, info, self)
        rt.install_common(installed, self.decoder, self.core, self.model)
        self.runtime = rt
        return installed


class QwenRuntime(VLMRuntime):
    def positions_mode(self) -> str:
        return "original"

    def image_features(self, pixel_values, image_grid_thw=None, **kwargs):
        core = self.adapter.core
        visual = core.visual
        if image_grid_thw is None:
            raise ValueError("Qwen-VL image features need image_grid_thw (the processor returns it)")
        out = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw, return_dict=True)
        merge = visual.spatial_merge_size
        thw = image_grid_thw.tolist()
        counts = [t * h * w // merge**2 for t, h, w in thw]
        grids = [(t * h // merge, w // merge) for t, h, w in thw]
        tokens = list(torch.split(out.pooler_output, counts))
        device = out.pooler_output.device
        self.begin(counts[0], grids[0], device)
        self.image_grids = grids  # llm-stage calls get each image's own grid
        self.slots = counts
        rasters = [torch.arange(c, device=device) for c in counts]
        if any(p.stage == "projector" for p in self.plan.points):
            groups: dict[tuple[int, int], list[int]] = {}
            for i, grid in enumerate(grids):
                groups.setdefault(grid, []).append(i)
            for grid, members in groups.items():
                feats = torch.stack([tokens[i] for i in members])
                raster = torch.stack([rasters[i] for i in members])
                self.n_visual, self.grid = feats.shape[1], grid
                signals = Signals(
                    {
                        "hidden": lambda feats=feats: feats,
                        "projected": lambda feats=feats: feats,
                        "text_embedding": lambda members=members: self._text_embedding_of(members),
                    }
                )
                ctx = self.context(Point("projector"), feats, raster, signals, images=members)
                sel = self.run_method(ctx)
                check_selection(sel, ctx, self.method.name, allow_extra=True)
                if sel.keep_cls:
                    raise RuntimeError(f"method {self.method.name!r} asked to keep CLS; Qwen-VL's tower has none")
                for j, (keep, merged, extra) in enumerate(sel.per_image()):
                    i = members[j]
                    kept = feats[j, keep] if merged is None else merged.to(feats.dtype)
                    rasters[i] = raster[j, keep]
                    if extra is not None:
                        kept = torch.cat([kept, extra.to(feats.dtype)])
                        rasters[i] = torch.cat([rasters[i], rasters[i].new_full((extra.shape[0],), -1)])
                    tokens[i] = kept
        padded = [torch.cat([t, t.new_zeros(c - t.shape[0], t.shape[1])]) for t, c in zip(tokens, counts)]
        self.images = [
            {"count": t.shape[0], "raster": r, "slots": c, "offset": 0} for t, r, c in zip(tokens, rasters, counts)
        ]
        out.pooler_output = padded
        return out

    def _text_embedding_of(self, members: list[int]):
        emb, mask = self._text_embedding()
        return emb[members], mask[members]
