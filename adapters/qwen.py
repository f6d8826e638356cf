"""The adapter for transformers' Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``).

Stages: ``encoder`` (before vision block ``l``, ``1 <= l <= depth - 1``, or ``l = depth``: after
the last block, on the merger's input), ``projector`` (on the merger's output: each token is one
2x2 group of patches, already in LLM space, in raster order of the merged grid) and ``llm``.

Encoder stage: the unit of pruning is the merge group (the ``spatial_merge_size**2``
patches that become one LLM token), so budgets count LLM tokens at every stage. The method
sees one token per alive group: the mean of its patches' hidden states (signal ``hidden``,
also ``ctx.tokens``), in raster order of the merged grid, with ``token_index`` the group's
raster index. A method's ``merged`` values (recovery methods) shift every patch of the kept
group by ``merged - mean``, so the group's mean becomes the merged value. Signals there:
``hidden``, ``text_embedding`` and ``encoder_qkv(layer)`` (default: the block just run) for every
vision block the method captures, per patch: ``[B, H, N * 4, D]``, each token's 4 patches on
consecutive rows (``ModelInfo.patches_per_token``), queries and keys after the block's rotary
embedding (FlowCut's mean-query relay; the tower has no CLS). The mechanics (packed sequence, ``cu_seqlens``
per frame and, for 2.5-VL, per window, rotary embeddings, the merger and 2.5-VL's window
reordering) are in :mod:`.qwen_vision`.

Images of different sizes have different token counts: at the encoder and projector
stages the method is called once per group of images with the same merged grid (and the
same number of alive tokens); a method whose encoder counts differ per image
(``encoder_per_image()``) is called once per image. The tower itself always runs once
on the whole packed batch, so a batch gives the same tokens as images one by one.

Encoder attention (projector stage, signal ``encoder_attention(layer=l, reduce="none")``): for
each vision block a method declares in ``capture_layers()`` a hook on the block's ``qkv``
projection keeps q and k, rotated by the model's own ``apply_rotary_pos_emb_vision`` with the
block's ``(cos, sin)``, and the ``cu_seqlens`` the block attended with; the probabilities are
recomputed per image as ``softmax(q k^T / sqrt(d))`` within each frame (Qwen2-VL and 2.5-VL's
full-attention blocks) or window (2.5-VL's other blocks), i.e. what the model computed, while
the tower itself keeps SDPA / flash attention. Patches are then mapped to merged tokens: the
rows of a 2x2 group's patches are averaged and the columns summed over each key group (rows
stay distributions), in raster order of the merged grid: ``[n_img_in_call, H, N, N]`` (or
head-``mean``/``sum`` ``[n_img_in_call, N, N]``) aligned with ``ctx.tokens``. The attention each
token receives (mean over rows) is then the official Qwen2.5-VL HiPrune reduction (sum over
queries, mean over a group's 4 patches) divided by N, the same ranking. Cost per image: ``H`` matrices
``[P, P]`` for P patches, computed one head at a time (peak memory ``P^2`` floats plus the
``[H, N, N]`` result, ``N = P / 4``). There is no CLS token, so ``cls_attention`` is not offered;
methods that require it get a clear error at ``wrap()`` (HoloV uses received attention there).

Projector-stage signals besides ``encoder_attention``: ``encoder_qkv`` (as at the encoder stage),
``projector_input`` (each token's 4 patches' last-block outputs, concatenated in the merger's
order, ``[B, N, 4 C_v]``: the merger's input, captured by a pre-hook) with ``projector`` (the
merger as a row-wise map of it, :class:`.qwen_vision.GroupProjector`; ZOO-Prune perturbs
there), and ``pixels`` (each token's ``2p x 2p`` pixel block, first temporal slice).

Positions: Qwen's 3-D M-RoPE positions are computed by transformers from the *full* prompt
(``mm_token_type_ids`` required) and the adapter gathers them for the kept tokens, so every
kept token keeps its own (t, h, w) position and text after the image keeps its position.
Decode steps therefore continue at the original positions and the model's cached
``rope_deltas`` stays valid unchanged ("original" positions for every method here). This
holds whichever stage removed a token: tokens removed in the encoder leave unused slots in
their image's placeholder span, which the language model's input hook removes.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmprune.context import ModelInfo, Point, Signals, VLMInfo, vlm_stages
from vlmprune.method import Method
from vlmprune.stats import Stats

from .base import Adapter, Installed, Plan, llm_cost, register_adapter
from .decoder import Decoder
from .qwen_vision import (
    AttentionCapture,
    PackedGroups,
    QwenTower,
    GroupProjector,
    group_attention,
    group_qkv,
    install_merger_input,
    install_qwen_capture,
    install_qwen_encoder,
)
from .vlm import ImageRecord, VLMRuntime, check_llm_attention, position_options

SIGNALS = (
    "hidden", "projected", "projector", "projector_input", "pixels", "encoder_attention", "encoder_qkv",
    "text_embedding", "text_attention", "llm_qkv", "relay_qkv", "sublayer_io", "instruction_states", "llm_norm",
    "llm_input",
)


@register_adapter
class QwenVLAdapter(Adapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    stages = ("encoder", "projector", "llm")
    options = position_options(offered=("original",))  # 3-D M-RoPE positions are gathered, never renumbered

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.core = model.model if hasattr(model, "lm_head") else model
        self.decoder = Decoder(self.core.language_model)
        self.tower = QwenTower(self.core.visual)
        self.config = model.config

    def info(self) -> VLMInfo:
        vc, tc = self.config.vision_config, self.config.text_config
        depth = vc.depth
        return VLMInfo(
            family=self.config.model_type,
            n_visual=None,  # depends on each image's size
            grid=None,
            has_cls=False,
            encoder_layers=depth,
            feature_layer=depth - 1,
            llm_layers=tc.num_hidden_layers,
            stages=vlm_stages(self.stages, has_cls=False),
            signals=SIGNALS,
            patches_per_token=self.tower.unit,
        )

    def cost(self, stats: Stats) -> dict:
        return llm_cost(self.decoder, self.config.text_config, stats)

    def check_plan(self, method: Method, points: list[Point]) -> None:
        check_llm_attention(self.model, method, points)

    def install(self, plan: Plan) -> Installed:
        info = self.info()
        installed = Installed()
        rt = QwenRuntime(plan, info, self)
        layers = []
        for p in plan.points:
            if p.stage != "encoder":
                continue
            if not isinstance(p.layer, int) or not 1 <= p.layer <= self.tower.depth:
                raise ValueError(
                    f"encoder pruning layer must be an int in [1, {self.tower.depth}] (before a vision block "
                    f"of this {self.tower.depth}-block tower, after the first; {self.tower.depth}: before the merger), "
                    f"got {p.layer!r}"
                )
            layers.append(p.layer)
        if layers:
            install_qwen_encoder(installed, self.tower, layers, lambda: rt.packed, rt.encoder_prune)
        capture = tuple(sorted({int(layer) % self.tower.depth for layer in plan.capture.get("encoder", ())}))
        if capture:
            install_qwen_capture(installed, self.tower, capture, lambda: rt.packed, lambda: rt.attention)
        rt.merger_input = any(p.stage == "projector" for p in plan.points) and "projector_input" in plan.method.needs
        if rt.merger_input:  # only for methods that read it (ZOO-Prune): nothing kept otherwise
            install_merger_input(installed, self.tower, lambda: rt.packed, lambda: rt.attention)
        rt.captured_blocks = capture
        rt.install_common(installed, self.decoder, self.core, self.model)
        self.runtime = rt
        return installed


class QwenRuntime(VLMRuntime):
    def __init__(self, plan: Plan, info: ModelInfo, adapter: QwenVLAdapter):
        super().__init__(plan, info, adapter)
        self.packed: PackedGroups | None = None  # set while the tower runs on this forward's images
        self.image_grids: list[tuple[int, int]] = []
        self.attention = AttentionCapture()  # q/k of the captured vision blocks, this forward
        self.captured_blocks: tuple[int, ...] = ()
        self.merger_input = False  # whether the merger's input is captured (signal projector_input)

    def positions_mode(self) -> str:
        return "original"

    def _groups(self, grids: list[tuple[int, int]], counts: list[int], per_image: bool) -> list[list[int]]:
        """Images the method sees together: same merged grid and same number of alive tokens
        (or one image per call)."""
        if per_image:
            return [[i] for i in range(len(grids))]
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(zip(grids, counts)):
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def image_features(self, pixel_values, image_grid_thw=None, **kwargs):
        core = self.adapter.core
        visual = core.visual
        if image_grid_thw is None:
            raise ValueError("Qwen-VL image features need image_grid_thw (the processor returns it)")
        merge = visual.spatial_merge_size
        thw = image_grid_thw.tolist()
        counts = [t * h * w // merge**2 for t, h, w in thw]
        grids = [(t * h // merge, w // merge) for t, h, w in thw]
        device = pixel_values.device
        self.begin(counts[0], grids[0], device)
        self.image_grids = grids  # llm-stage calls get each image's own grid
        self.slots = counts
        self.attention = AttentionCapture()
        if any(p.stage == "encoder" for p in self.plan.points) or self.captured_blocks or self.merger_input:
            self.packed = PackedGroups(self.adapter.tower, image_grid_thw.to(device))
        try:
            out = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw, return_dict=True)
            packed = self.packed
        finally:
            self.packed = None
        if packed is not None and packed.pruned:
            rasters = [packed.kept_rasters(i) for i in range(len(counts))]
            tokens = [out.pooler_output[off + r] for off, r in zip(packed.offsets, rasters)]
        else:
            rasters = [torch.arange(c, device=device) for c in counts]
            tokens = list(torch.split(out.pooler_output, counts))
        if any(p.stage == "projector" for p in self.plan.points):
            for members in self._groups(grids, [t.shape[0] for t in tokens], per_image=False):
                feats = torch.stack([tokens[i] for i in members])
                raster = torch.stack([rasters[i] for i in members])
                grid = grids[members[0]]
                self.n_visual, self.grid = counts[members[0]], grid
                signals = Signals(
                    {
                        "hidden": lambda feats=feats: feats,
                        "projected": lambda feats=feats: feats,
                        "projector": lambda: GroupProjector(self.adapter.tower),
                        "projector_input": lambda members=members: self._merger_input(packed, members),
                        "pixels": lambda members=members, raster=raster: self._pixels(pixel_values, thw, members, raster),
                        "encoder_attention": lambda layer=None, reduce="none", members=members, raster=raster: (
                            self._encoder_attention(packed, members, raster, layer, reduce)
                        ),
                        "encoder_qkv": lambda layer=None, members=members, raster=raster: (
                            self._encoder_qkv(packed, members, raster, self.info.feature_layer if layer is None else layer)
                        ),
                        "text_embedding": lambda members=members: self._text_embedding_of(members),
                    }
                )
                red = self.run(Point("projector"), feats, raster, signals, images=members)
                sel = red.selection
                if sel.keep_cls:
                    raise RuntimeError(f"method {self.method.name!r} asked to keep CLS; Qwen-VL's tower has none")
                # the merger's output is both the tokens and the LLM-space ("projected") values
                values, kept_raster = red.tokens(feats, spaces=("tokens", "projected")), red.apply(raster)
                for j, (_, _, extra) in enumerate(sel.per_image()):
                    i = members[j]
                    kept, rasters[i] = values[j], kept_raster[j]
                    if extra is not None:
                        kept = torch.cat([kept, extra.to(feats.dtype)])
                        rasters[i] = torch.cat([rasters[i], rasters[i].new_full((extra.shape[0],), -1)])
                    tokens[i] = kept
        self.attention = AttentionCapture()  # release the captured q/k
        padded = [torch.cat([t, t.new_zeros(c - t.shape[0], t.shape[1])]) for t, c in zip(tokens, counts)]
        self.images = [ImageRecord(t.shape[0], r, c) for t, r, c in zip(tokens, rasters, counts)]
        out.pooler_output = padded
        return out

    def encoder_prune(self, layer: int, hidden: torch.Tensor, packed: PackedGroups) -> torch.Tensor:
        """Before vision block ``layer``: the method keeps whole merge groups (see the module
        docstring); returns the kept rows of ``hidden`` ``[S, C]`` and shrinks ``packed``."""
        unit = self.adapter.tower.unit
        groups = hidden.view(-1, unit, hidden.shape[-1])  # [G_alive, m^2, C], packed order
        means = groups.mean(1)
        n_img = len(packed.counts)
        members_of = [packed.members(i) for i in range(n_img)]
        keep = torch.zeros(groups.shape[0], dtype=torch.bool, device=hidden.device)
        shift = None
        calls = self._groups(self.image_grids, [m[0].numel() for m in members_of], self.method.encoder_per_image())
        for members in calls:
            pos = torch.stack([members_of[i][0] for i in members]).to(hidden.device)  # [B, N] into the alive groups
            raster = torch.stack([members_of[i][1] for i in members]).to(hidden.device)
            tokens = means[pos]
            self.n_visual, self.grid = packed.counts[members[0]], self.image_grids[members[0]]
            signals = Signals(
                {
                    "hidden": lambda tokens=tokens: tokens,
                    "encoder_qkv": lambda layer=layer - 1, members=members, raster=raster: (
                        self._encoder_qkv(packed, members, raster, layer)
                    ),
                    "text_embedding": lambda members=members: self._text_embedding_of(members),
                }
            )
            sel = self.run(Point("encoder", layer), tokens, raster, signals, images=members).selection
            for j, (k, merged, _) in enumerate(sel.per_image()):
                chosen = pos[j, k]
                keep[chosen] = True
                if merged is not None:
                    if shift is None:
                        shift = torch.zeros_like(means)
                    shift[chosen] = merged.to(means.dtype) - means[chosen]
        if shift is not None:
            groups = groups + shift[:, None]
        packed.alive = packed.alive[keep.to(packed.alive.device)]
        return groups[keep].reshape(-1, hidden.shape[-1])

    def _captured(self, packed, layer: int) -> dict:
        store = self.attention.blocks
        if packed is None or layer not in store:
            raise KeyError(
                f"vision block {layer} was not captured; captured: {sorted(store)}. "
                "Declare it in the method's capture_layers()."
            )
        return store[layer]

    @staticmethod
    def _locate(ids: torch.Tensor, raster: torch.Tensor, image: int, layer: int) -> torch.Tensor:
        """Positions in ``ids`` (ascending raster ids alive at ``layer``) of the current tokens."""
        raster = raster.to(ids.device)
        pos = torch.searchsorted(ids, raster)
        if (pos >= ids.numel()).any() or not torch.equal(ids[pos.clamp_max(ids.numel() - 1)], raster):
            raise RuntimeError(f"vlmprune: a current token of image {image} was not alive at vision block {layer}")
        return pos

    def _encoder_attention(self, packed, members: list[int], raster: torch.Tensor, layer, reduce: str) -> torch.Tensor:
        """Signal ``encoder_attention``: per image of the call, the attention probabilities of
        vision block ``layer`` (0-based; default: the last, the feature layer) among that image's
        merged tokens, ``[B, H, N, N]`` (``reduce="none"``) or head-``"mean"``/``"sum"``
        ``[B, N, N]``, aligned with ``ctx.tokens`` (see :func:`.qwen_vision.group_attention`)."""
        layer = self.info.feature_layer if layer is None else int(layer) % self.adapter.tower.depth
        captured = self._captured(packed, layer)
        if reduce not in ("none", "mean", "sum"):
            raise ValueError(f"reduce must be one of 'none', 'mean', 'sum', got {reduce!r}")
        out = []
        for j, i in enumerate(members):
            probs, ids = group_attention(self.adapter.tower, packed, captured, i)
            pos = self._locate(ids, raster[j], i, layer)
            out.append(probs[:, pos][:, :, pos])
        probs = torch.stack(out)
        if reduce == "mean":
            return probs.mean(1)
        if reduce == "sum":
            return probs.sum(1)
        return probs

    def _encoder_qkv(self, packed, members: list[int], raster: torch.Tensor, layer: int):
        """Signal ``encoder_qkv``: per image of the call, vision block ``layer``'s per-head
        queries and keys (after its rotary embedding) and values of the patches of the current
        tokens, ``[B, H, N * m^2, D]`` each: token ``j``'s ``m^2`` patches on rows
        ``j m^2 .. (j + 1) m^2 - 1`` (``ModelInfo.patches_per_token``), in the merger's order."""
        layer = int(layer) % self.adapter.tower.depth
        captured = self._captured(packed, layer)
        unit = self.adapter.tower.unit
        out = []
        for j, i in enumerate(members):
            (q, k, v), ids = group_qkv(self.adapter.tower, packed, captured, i)
            pos = self._locate(ids, raster[j], i, layer)
            rows = (pos[:, None] * unit + torch.arange(unit, device=pos.device)).flatten()
            out.append((q[:, rows], k[:, rows], v[:, rows]))
        return tuple(torch.stack(t) for t in zip(*out))

    def _merger_input(self, packed, members: list[int]) -> torch.Tensor:
        """Signal ``projector_input``: what the merger maps to each current token, its ``m^2``
        patches' last-block outputs concatenated in the merger's order, ``[B, N, m^2 C_v]``
        (the input of signal ``projector``)."""
        x = self.attention.merger_input
        if packed is None or x is None:
            raise RuntimeError(
                f"vlmprune: the merger's input was not captured; method {self.method.name!r} must list "
                "'projector_input' in its needs"
            )
        groups = x.reshape(-1, self.adapter.tower.unit * x.shape[-1])  # alive groups, packed order
        return torch.stack([groups[packed.members(i)[0].to(groups.device)] for i in members])

    def _pixels(self, pixel_values: torch.Tensor, thw: list, members: list[int], raster: torch.Tensor) -> torch.Tensor:
        """Signal ``pixels``: each current token's pixel patch ``[B, N, C, m p, m p]``: its
        ``m x m`` patches (the processor stores each merge group's patches consecutively, each
        as ``[C, T, p, p]``) joined, first temporal slice (an image's slices are copies)."""
        visual = self.adapter.core.visual
        m, p, c = visual.spatial_merge_size, visual.config.patch_size, visual.config.in_channels
        sizes = [t * h * w for t, h, w in thw]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        out = []
        for j, i in enumerate(members):
            image = pixel_values[starts[i] : starts[i] + sizes[i]].view(-1, m, m, c, visual.config.temporal_patch_size, p, p)
            groups = image[raster[j].to(image.device), :, :, :, 0]  # [N, m, m, C, p, p]
            out.append(groups.permute(0, 3, 1, 4, 2, 5).reshape(groups.shape[0], c, m * p, m * p))
        return torch.stack(out)

    def _text_embedding_of(self, members: list[int]):
        emb, mask = self._text_embedding()
        return emb[members], mask[members]
