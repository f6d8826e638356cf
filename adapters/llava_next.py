"""The adapter for transformers' LLaVA-NeXT (``LlavaNextForConditionalGeneration`` /
``LlavaNextModel``, model_type ``"llava_next"``): "anyres" images, each encoded as a base image
(the whole picture resized to the tower's size) plus a grid of tiles, with an ``image_newline``
vector after every row of the (un-padded) tile grid.

**Layout.** transformers packs one image as ``[base tokens (raster order)] [tile rows]``: the
tiles' patch grids are joined into one big grid of ``rows x side`` by ``cols x side`` tokens,
the rows and columns that only cover the letterbox padding are cut off (``unpad_image``) and
each remaining row is followed by one newline token. The adapter learns this layout by passing
an id tensor through the model's own ``pack_image_features``, so it knows which slot holds which
(crop, raster) token and which slots are newlines, for any transformers version that packs the
same way.

**Stages.** ``encoder`` (between vision blocks, per crop), ``projector`` (on the vision features
of each crop, before the projector maps them) and ``llm`` (before decoder layer K in prefill, with
the shared decoder machinery of :mod:`adapters.decoder`).

*Encoder stage: one image row per crop.* Every crop (the base image, each tile) goes through the
CLIP tower as one row of the batch, on its full ``side x side`` grid (un-padding comes later):
``ctx.grid`` is ``(side, side)``, ``ctx.token_index`` the raster index in the crop's grid,
``ctx.images`` the crop's index among all crops of the forward plus the number of images (as at
the projector stage). The crop's budget at an encoder point is its share of the image's budget at
that point, split as at the projector stage (below: in proportion to the crops' *un-padded*
token counts); a crop whose share covers all its un-padded tokens keeps its whole grid (so a full
budget prunes nothing), and a crop whose share is 0 at some encoder point is dropped whole (it
does not run through the tower). Candidates are all tokens of the grid, letterbox padding
included (as in FlowCut's official NeXT path): tokens kept in the padding are then cut by
un-padding, so an image can reach the LLM with fewer tokens than its budget. The tower runs once
per image and crop share (the crops of one image with the same shares at every encoder point run
as one batch, in crop order), so a method's batch-wide choice (FlowCut's default batch-max
count) is taken over those crops, and a batch gives the same result as its images one by one;
methods asking for ``encoder_per_image()`` (FlowCut ``count="per_image"``) run each crop alone.
Each tower run gets a fresh random generator seeded by the method's ``seed``. Tokens pruned in
the tower are simply absent afterwards: un-padding, the newline rule and the placement below act
on the surviving raster indices (a crop's surviving tokens of the base image keep the method's
order). Encoder points need a single ``vision_feature_layer`` and a layer in
``[1, feature layer]``; a method with both encoder and projector points is refused (the
projector stage here is per un-padded crop, not per surviving set). ``stats["points"]`` has one
entry per tower run and point, one count per crop. With encoder points, the output of
``get_image_features`` carries no ``hidden_states`` / ``last_hidden_state`` (the crops' token
counts differ between runs), only the packed features.

*Projector stage, whole images* (methods with ``projector_whole_image``, HoloV): one call per
image on its base and un-padded tile tokens in packed order, newlines left out (``token_index``
in the llm-stage numbering below, the image's budget); ``cls_attention`` is each crop's own.

*Projector stage: one token set per crop.* Each crop (the base image, each tile) is one row of
``ctx.tokens``; a tile holds only its tokens that survive un-padding, which always form a
rectangle, so ``ctx.grid`` is that rectangle (``side x side`` for the base image and for tiles
un-padding does not touch) and ``ctx.token_index`` the raster index inside it. Crops with the
same grid and budget share one call. Encoder signals (CLS attention, encoder attention / q, k, v)
come from each crop's own pass through the tower, ``pixels`` from its own pixels;
``text_embedding`` is the prompt of the crop's image. ``ctx.images`` holds, per row, the crop's
index among all crops of the forward plus the number of images (so per-row ``image_state`` of
crops never mixes with the ``llm`` stage's per-image state; ``ctx.parts`` reaches the latter,
see *Per-image state across stages*). Each call gets a fresh random
generator seeded by the method's ``seed``, so a crop's result does not depend on how the crops of
a batch were grouped. ``stats["points"]`` has one projector entry per call, one count per crop.

*Budget split.* The budget is per image and refers to the image's visual tokens: base tokens
plus un-padded tile tokens (newline tokens excluded). At the projector stage the image's budget
``B`` is split over its crops in proportion to their token counts ``n_c`` (largest remainder:
``floor(B n_c / N)`` each, then one more to the crops with the largest remainders, ties to the
earlier crop, the base image first); ``B = N`` keeps everything. A crop whose share is 0 is
dropped whole (the method is not called for it). The ``llm`` stage sees all visual tokens of an
image at once (per-image budget, grid: the crops stacked vertically, ``(crops * side, side)``,
``token_index = crop * side**2 + raster``, the base image is crop 0).

*Newline tokens.* They are not visual tokens: never candidates, never counted in stats or
budgets. After the projector stage a row's newline is kept iff that row keeps at least one
token (so a grid row that lost every token leaves nothing behind); inside the LLM newline tokens
are kept like text.

*Order and positions.* Base-image tokens reach the LLM first, in the method's order (CLS first
when a method keeps it, extra tokens after); then the kept tile tokens in the unwrapped model's
packed order (row by row over the joined tile grid) with the kept newlines; then each tile's
CLS / extra tokens, tile by tile. As for LLaVA, the surviving tokens fill the first slots of the
image's placeholder span and the language model's input hook removes the unused slots; positions
are renumbered (``"compact"``) unless the method asks for ``"original"`` (each kept token keeps
the position of the slot it came from).

*Packings* (a method's ``next_packing`` option; ``"adapter"`` for methods without one). The rules
above are ``"adapter"``, the general rule. Methods whose official NeXT code packs otherwise
declare it, and their default follows the code:

- ``"unpad"`` (FlowCut's and HoloV's code): un-padded as above, no newline tokens at all; the
  base image's kept tokens (method's order), then the kept tile tokens in packed order; a
  whole-image method's kept tokens go in its own order, as it returned them (HoloV's code hands
  its output to the LLM as it is).
- ``"spatial"`` (HiPrune's code, ``mm_patch_merge_type='spatial'``): no un-padding and no
  newlines. Every crop is a whole ``side x side`` grid at the encoder and projector stages
  (letterbox tokens included); an image's tokens are ``crops * side**2`` (budget fractions and
  stats refer to that), packed as the base image's kept tokens, then the kept tokens of the
  joined ``rows*side x cols*side`` tile grid row by row. ``positions="original"`` is refused
  (a letterbox token has no placeholder slot).

The prompt's placeholder span (from the processor) counts un-padded tokens plus newlines, and
kept tokens fill its first slots, so under ``"spatial"`` an image whose kept tokens outnumber
its span (a budget above the span, e.g. every token of a letterboxed image) is a ValueError at
the forward naming the span and ``next_packing="adapter"``. At a full budget, ``"unpad"`` and
``"spatial"`` are not the unwrapped model (it has newlines and, for ``"spatial"``, no letterbox
tokens); ``"adapter"`` is.

Multiple images per prompt, batches of images with different tile counts (``pixel_values`` 5-D
padded as the processor returns it, or 4-D concatenated crops) and left padding are supported.

*Per-image state across stages.* An encoder- or projector-stage row is a crop, but ``ctx.parts`` (one
:class:`~vlmprune.context.ImagePart` per row, read through ``ctx.whole_images()``) tells the
method where the crop sits in its image: ``state`` is the image's own ``image_state`` dict (the
object the ``llm`` stage hands the method for that image, shared by all crops of the image in
this forward), ``index`` each token's id in the ``llm`` stage's numbering (``crop * side**2 +
raster`` with the tower raster, the base image is crop 0), ``grid`` the ``llm``-stage grid
``(crops * side, side)``, ``n`` / ``budget`` / ``target`` the whole image's counts, ``part`` the
crop index, and ``layout_index`` / ``layout_grid`` the token's place in the model's 2-D layout
of its region: the base image's ``side x side`` grid for crop 0, the joined, un-padded tile grid
(``rows x cols`` as packed, newline column excluded) for tiles (projector stage only; at the
encoder stage ``index`` covers the crop's whole grid, padding included, and the layout fields
are None). So a method carries a per-image
map from the crops into the LLM (VFlowOpt's importance map) without knowing the packing. The
method still chooses per crop (the crop's row), so a choice ranked over the whole image (as
VFlowOpt's official code does) becomes one per crop: see the method's docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmprune.context import ImagePart, ModelInfo, Point, Signals, VLMInfo, vlm_stages

from .base import Installed, Plan, new_generator, register_adapter
from .llava import LlavaAdapter, LlavaRuntime, _pixel_patches
from .vision import (
    EncoderCapture,
    encoder_signals,
)
from .vlm import ImageRecord, VLMRuntime


@dataclass
class PackedImageRecord(ImageRecord):
    """An image record with newline tokens among its kept slots: ``source`` ``[count]``: each
    slot's offset in the unpruned span (-1: none); ``visual`` ``[count]``: which slots are visual
    tokens (not newlines); ``total``: the image's visual tokens before pruning."""

    source: torch.Tensor = field(kw_only=True)
    visual: torch.Tensor = field(kw_only=True)
    total: int = field(kw_only=True)


def split_budget(budget: int, counts: list[int]) -> list[int]:
    """Share ``budget`` over parts of sizes ``counts`` in proportion (largest remainder, ties to
    the earlier part)."""
    total = sum(counts)
    if not 0 <= budget <= total:
        raise ValueError(f"budget must be in [0, {total}], got {budget}")
    shares = [budget * c // total for c in counts]
    remainders = [budget * c - s * total for c, s in zip(counts, shares)]
    order = sorted(range(len(counts)), key=lambda i: (-remainders[i], i))
    for i in order[: budget - sum(shares)]:
        shares[i] += 1
    return shares


#: values of a method's ``next_packing`` (see the module docstring, *Packings*)
PACKINGS = ("adapter", "unpad", "spatial")


def packing_of(method) -> str:
    """The method's LLaVA-NeXT packing: its ``next_packing`` option, ``"adapter"`` if it has none."""
    packing = getattr(method, "next_packing", "adapter")
    if packing not in PACKINGS:
        raise ValueError(f"option 'next_packing' of method {method.name!r} must be one of {list(PACKINGS)}, got {packing!r}")
    return packing


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    model_types = ("llava_next",)
    stages = ("encoder", "projector", "llm")

    def info(self) -> VLMInfo:
        tc = self.config.text_config
        return VLMInfo(
            family="llava_next",
            n_visual=None,  # depends on each image's size (tiles, un-padding)
            grid=None,
            has_cls=self.tower.has_cls,
            encoder_layers=self.tower.depth,
            feature_layer=self._feature_layer(),
            llm_layers=tc.num_hidden_layers,
            stages=vlm_stages(self.stages, has_cls=self.tower.has_cls),
        )

    def max_visual(self) -> int:
        """The most visual tokens one image can bring: the base crop plus the tiles of the largest
        ``image_grid_pinpoints`` resolution, ``side**2 * (1 + tiles)`` (un-padding only removes
        tokens; each image's own count is checked again at the first forward)."""
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        tiles = max((h // vc.image_size) * (w // vc.image_size) for h, w in self.config.image_grid_pinpoints)
        return side * side * (1 + tiles)

    def install(self, plan: Plan) -> Installed:
        name = plan.method.name
        if any(p.stage == "encoder" for p in plan.points) and any(p.stage == "projector" for p in plan.points):
            raise ValueError(
                f"method {name!r} acts at both the encoder and the projector stage, which the LLaVA-NeXT adapter "
                "does not support (its projector stage runs per un-padded crop, not per surviving token set)"
            )
        packing = packing_of(plan.method)
        if packing == "spatial" and (plan.adapter_options.get("positions") or plan.method.positions) == "original":
            raise ValueError(
                f"method {name!r} with next_packing='spatial' keeps tokens of the letterbox padding, which have no "
                "placeholder to take an original position from; use positions='compact' (the official code "
                "renumbers) or next_packing='adapter'"
            )
        return super().install(plan)

    def make_runtime(self, plan: Plan, info: ModelInfo) -> "LlavaNextRuntime":
        return LlavaNextRuntime(plan, info, self)


class LlavaNextRuntime(VLMRuntime):
    def __init__(self, plan: Plan, info: ModelInfo, adapter: LlavaNextAdapter):
        super().__init__(plan, info, adapter)
        self.capture = EncoderCapture()
        self.alive: torch.Tensor | None = None
        self.image_grids: list[tuple[int, int]] | None = None  # llm-stage grid per image
        self._call_budget: tuple[int, int] | None = None  # (budget, target) of the current crop call
        self._enc_budgets: dict | None = None  # encoder point -> (budget, target) of the current tower run
        self._enc_rows: list[tuple[int, int, dict]] | None = None  # (image, crop, layout) per row of that run
        self.image_ids: list[int] | None = None  # ctx.images of the current tower run (crop keys)
        self.packing = packing_of(plan.method)

    def budget_at(self, point: Point) -> tuple[int, int]:
        if self._call_budget is not None:
            return self._call_budget
        if self._enc_budgets is not None and point.stage == "encoder":
            return self._enc_budgets[point]
        return super().budget_at(point)

    def context(self, point, tokens, token_index, signals, images=None, cls_token=None):
        """Encoder-stage contexts also get each crop's place in its image (``ctx.parts``)."""
        ctx = super().context(point, tokens, token_index, signals, images=images, cls_token=cls_token)
        if point.stage == "encoder" and self._enc_rows is not None:
            # every crop's whole grid is a candidate in the tower
            ctx.parts = [
                self._image_part(point, image, crop, lay, token_index[j], (self.n_visual,) * lay["crops"])
                for j, (image, crop, lay) in enumerate(self._enc_rows)
            ]
        return ctx

    # the tower's pre-hooks call this with the current run's crops as image rows
    encoder_prune = LlavaRuntime.encoder_prune

    # -- layout ------------------------------------------------------------------------------------
    def _layouts(self, image_sizes, crops: list[int], n: int, side: int, strategy: str) -> list[dict]:
        """Per image: which (crop, raster) each slot of its span holds (packed as transformers
        packs features) and each crop's un-padded rectangle."""
        core = self.adapter.core
        ids = [torch.arange(k * n, dtype=torch.float64).view(k, n, 1) for k in crops]
        newline = torch.tensor([-1.0], dtype=torch.float64)
        packed, _ = core.pack_image_features(ids, image_sizes, strategy, image_newline=newline)
        layouts = []
        for k, p in zip(crops, packed):
            slot_ids = p[:, 0].round().long()
            is_nl = slot_ids < 0
            gid = slot_ids.clamp(min=0)
            crop, raster = gid // n, gid % n
            slot_of = torch.full((k, n), -1, dtype=torch.long)
            tok = (~is_nl).nonzero().flatten()
            slot_of[crop[tok], raster[tok]] = tok
            base_len = 0
            if k > 1:  # the base image's tokens lead, without newlines
                lead = (crop == 0) & ~is_nl
                base_len = int(lead.long().cumprod(0).sum())
            # joined-grid coordinates of the packed part (after the base prefix): a newline ends a row
            tail_nl = is_nl[base_len:].long()
            tail_row = tail_nl.cumsum(0) - tail_nl
            tail_pos = torch.arange(tail_nl.numel())
            row_start = torch.full((int(tail_row.max()) + 1 if tail_row.numel() else 1,), tail_nl.numel(), dtype=torch.long)
            row_start = row_start.scatter_reduce(0, tail_row, tail_pos, reduce="amin")
            tail_col = tail_pos - row_start[tail_row]
            tile_tok = ~is_nl[base_len:] & (crop[base_len:] > 0)
            tile_w = int(tail_col[tile_tok].max()) + 1 if bool(tile_tok.any()) else 0
            tile_h = int(tail_row[tile_tok].max()) + 1 if bool(tile_tok.any()) else 0
            parts = []
            for c in range(k):
                rasters = (slot_of[c] >= 0).nonzero().flatten()  # ascending = row-major
                rows, cols = rasters // side, rasters % side
                h, w = int(rows.unique().numel()), int(cols.unique().numel())
                if h * w != rasters.numel():
                    raise RuntimeError(f"vlmprune: crop {c} of an image keeps a non-rectangular token set after un-padding")
                if c == 0:  # the base image: its own side x side grid
                    where, region = rasters, (side, side)
                else:  # a tile: its place in the joined, un-padded tile grid (newline column excluded)
                    at = slot_of[c, rasters] - base_len
                    where, region = tail_row[at] * tile_w + tail_col[at], (tile_h, tile_w)
                parts.append({"raster": rasters, "grid": (h, w), "layout_index": where, "layout_grid": region})
            # the packing's visual sequence (crop, raster), base first: the packed slots without newlines
            seq = slot_ids[~is_nl]
            if self.packing == "spatial":  # whole crops; tiles joined in raster order, padding included
                parts, seq = self._spatial(image_sizes[len(layouts)], k, side)
            layouts.append(
                {"crops": k, "slot_ids": slot_ids, "is_nl": is_nl, "crop": crop, "raster": raster,
                 "slot_of": slot_of, "base_len": base_len, "parts": parts,
                 "counts": [int(part["raster"].numel()) for part in parts],  # candidate tokens per crop
                 "total": int(seq.numel()), "slots": int(slot_ids.numel()),
                 "seq_crop": seq // n, "seq_raster": seq % n}
            )
        return layouts

    def _spatial(self, image_size, k: int, side: int) -> tuple[list[dict], torch.Tensor]:
        """The official ``mm_patch_merge_type='spatial'`` layout of a ``k``-crop image: every crop
        whole (``side x side``), the tiles joined into one ``rows*side x cols*side`` grid; returns
        the crops' parts and the sequence ``crop * side**2 + raster`` (base image, then the joined
        grid row by row)."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        n = side * side
        full = torch.arange(n)
        parts = [{"raster": full, "grid": (side, side), "layout_index": full, "layout_grid": (side, side)}]
        if k == 1:
            return parts, full
        cfg = self.adapter.config
        rows, cols = get_anyres_image_grid_shape(image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        joined = torch.arange(n, k * n).view(rows, cols, side, side).permute(0, 2, 1, 3).flatten()
        where = torch.empty_like(joined)
        where[joined - n] = torch.arange(joined.numel())  # joined-grid index of each tile token
        region = (rows * side, cols * side)
        parts += [{"raster": full, "grid": (side, side), "layout_index": where[(c - 1) * n : c * n], "layout_grid": region}
                  for c in range(1, k)]
        return parts, torch.cat([full, joined])

    # -- vision side ---------------------------------------------------------------------------------
    def image_features(
        self, pixel_values, image_sizes=None, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs
    ):
        from transformers.models.llava_next.modeling_llava_next import (
            image_size_to_num_patches,
        )

        adapter = self.adapter
        core, tower, cfg = adapter.core, adapter.tower, adapter.config
        if image_sizes is None:
            raise ValueError("image_sizes is required for LLaVA-NeXT image features (the processor returns it)")
        vfl = cfg.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = cfg.vision_feature_select_strategy if vision_feature_select_strategy is None else vision_feature_select_strategy
        vc = cfg.vision_config
        side = vc.image_size // vc.patch_size
        n = side * side
        crops = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, vc.image_size) for s in image_sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:k] for pv, k in zip(pixel_values, crops)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must have 4 or 5 dimensions, got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] != sum(crops):
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} crops; image_sizes asks for {sum(crops)} ({crops})")
        device = pixel_values.device
        layouts = self._layouts(image_sizes, crops, n, side, strategy)
        n_img = len(crops)
        self.begin(layouts[0]["total"], (side, side), device)
        self.slots = [lay["slots"] for lay in layouts]
        self.image_grids = [(lay["crops"] * side, side) for lay in layouts]
        crop_start = [sum(crops[:i]) for i in range(n_img)]
        owner = [i for i, k in enumerate(crops) for _ in range(k)]  # image of each crop
        # per crop: kept local indices (None: all, in order), their values, extra tokens, keep CLS
        chosen: list[dict] = [{"keep": None, "values": None, "projected": None, "extra": None, "cls": False} for _ in owner]
        enc_points = [p for p in self.plan.points if p.stage == "encoder"]
        if enc_points:
            if int(strategy == "default") != int(tower.has_cls):
                raise ValueError(
                    f"vision_feature_select_strategy={strategy!r} does not give the {side}x{side} patch grid "
                    "LLaVA-NeXT packs (use 'default' with a CLS tower, 'full' without)"
                )
            out, feats, cls_tok = self._encoder_stage(
                enc_points, pixel_values, layouts, crops, crop_start, owner, chosen, n_img, n, side, vfl
            )
        else:
            self.capture.clear()
            self.alive = torch.arange(n, device=device).expand(pixel_values.shape[0], -1)
            out = core.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
            layers = [vfl] if isinstance(vfl, int) else list(vfl)
            hidden = torch.cat([out.hidden_states[layer] for layer in layers], dim=-1)
            if strategy == "default":
                feats, cls_tok = hidden[:, 1:], (hidden[:, 0] if tower.has_cls else None)
            else:
                feats, cls_tok = hidden, None
            if feats.shape[1] != n:
                raise ValueError(
                    f"vision_feature_select_strategy={strategy!r} gives {feats.shape[1]} tokens per crop, not the "
                    f"{side}x{side} patch grid LLaVA-NeXT packs (use 'default' with a CLS tower, 'full' without)"
                )
        if any(p.stage == "projector" for p in self.plan.points):
            self._projector_stage(Point("projector"), feats, cls_tok, pixel_values, layouts, crops, crop_start, owner, chosen, n_img)
        self.images = []
        vision, assembled = [], []
        for i, lay in enumerate(layouts):
            entries = self._assemble(lay, feats[crop_start[i] : crop_start[i] + crops[i]], cls_tok, crop_start[i],
                                     chosen[crop_start[i] : crop_start[i] + crops[i]], n)
            vision.append(entries["vision"])
            assembled.append(entries)
        projected = core.multi_modal_projector(torch.cat(vision)).split([v.shape[0] for v in vision])
        projected = [self._llm_space_values(p, lay, entries, chosen[crop_start[i] : crop_start[i] + crops[i]], n)
                     for i, (p, lay, entries) in enumerate(zip(projected, layouts, assembled))]
        newline = core.image_newline
        padded = []
        for i, (lay, entries, proj) in enumerate(zip(layouts, assembled, projected)):
            count, slots = entries["count"], lay["slots"]
            if count > slots and self.packing != "adapter":
                raise ValueError(
                    f"method {self.method.name!r} with next_packing={self.packing!r} keeps {count} tokens of image {i}, "
                    f"but its placeholder span holds {slots} (the processor counts un-padded tokens and newlines): "
                    f"give a budget of at most {slots} tokens for this image, or next_packing='adapter' (which always fits)"
                )
            if count > slots:
                raise RuntimeError(f"method {self.method.name!r} produced {count} tokens for {slots} image slots")
            full = proj.new_zeros(slots, proj.shape[-1])
            full[entries["vision_pos"]] = proj
            full[entries["newline_pos"]] = newline.to(proj.dtype)
            padded.append(full)
            self.images.append(PackedImageRecord(count, entries["raster"], slots, source=entries["source"],
                                                 visual=entries["visual"], total=lay["total"]))
        out.pooler_output = padded
        return out

    def _encoder_stage(self, points, pixel_values, layouts, crops, crop_start, owner, chosen, n_img, n, side, vfl):
        """Run the tower per image and crop share with the encoder points' pre-hooks pruning; return
        an output object, the feature-layer features scattered back on each crop's full grid
        (``[crops, n, D]``, zeros where pruned), the CLS rows and, in ``chosen``, each crop's
        surviving tokens as indices into its un-padded rasters (in the method's order)."""
        device = pixel_values.device
        tower, core = self.adapter.tower, self.adapter.core
        off = int(tower.has_cls)
        shares: list[dict] = [{} for _ in owner]  # per crop: point -> (budget, target) in the tower
        for i, lay in enumerate(layouts):
            counts = lay["counts"]
            for p in points:
                budget, target = self._image_budget(p, lay["total"])
                for c, (b, t) in enumerate(zip(split_budget(budget, counts), split_budget(target, counts))):
                    # a share covering the crop's un-padded tokens keeps its whole grid
                    shares[crop_start[i] + c][p] = (n if b >= counts[c] else b, n if t >= counts[c] else t)
        per_crop = self.method.encoder_per_image()
        groups: dict[tuple, list[int]] = {}
        for g in range(len(owner)):
            if any(b == 0 for b, _ in shares[g].values()):  # dropped whole
                chosen[g]["keep"] = torch.empty(0, dtype=torch.long, device=device)
                continue
            key = (g,) if per_crop else (owner[g], tuple(shares[g][p] for p in points))
            groups.setdefault(key, []).append(g)
        feats = cls_tok = first = None
        saved = self.grid, self.n_visual
        self.grid, self.n_visual = (side, side), n
        try:
            for members in groups.values():
                idx = torch.tensor(members, device=device)
                self.capture = EncoderCapture()
                self.alive = torch.arange(n, device=device).expand(len(members), -1)
                self.image_ids = [n_img + g for g in members]
                self._enc_budgets = shares[members[0]]
                self._enc_rows = [(owner[g], g - crop_start[owner[g]], layouts[owner[g]]) for g in members]
                self.generator = new_generator(self.method.seed, device)
                out = core.vision_tower(pixel_values[idx], output_hidden_states=True, return_dict=True)
                hidden = out.hidden_states[vfl]
                if hidden.shape[1] - off != self.alive.shape[1]:
                    raise RuntimeError(
                        f"vlmprune: the feature layer holds {hidden.shape[1] - off} patches, {self.alive.shape[1]} alive"
                    )
                if feats is None:
                    first = out
                    feats = hidden.new_zeros(len(owner), n, hidden.shape[-1])
                    cls_tok = hidden.new_zeros(len(owner), hidden.shape[-1]) if off else None
                feats[idx[:, None], self.alive] = hidden[:, off:]
                if off:
                    cls_tok[idx] = hidden[:, 0]
                for j, g in enumerate(members):
                    rasters = layouts[owner[g]]["parts"][g - crop_start[owner[g]]]["raster"].to(device)
                    local = torch.full((n,), -1, dtype=torch.long, device=device)
                    local[rasters] = torch.arange(rasters.numel(), device=device)
                    keep = local[self.alive[j]]
                    chosen[g]["keep"] = keep[keep >= 0]  # tokens kept in the padding are cut by un-padding
        finally:
            self._enc_budgets, self._enc_rows, self.image_ids = None, None, None
            self.grid, self.n_visual = saved
        if first is None:
            raise RuntimeError("vlmprune: every crop's encoder budget share is 0 at some encoder point; raise the budget")
        # hidden states of crops with different survivors cannot be stacked: not returned
        first.hidden_states, first.last_hidden_state = None, None
        if hasattr(first, "attentions"):
            first.attentions = None
        return first, feats, cls_tok

    def _projector_stage(self, point, feats, cls_tok, pixel_values, layouts, crops, crop_start, owner, chosen, n_img):
        if self.method.projector_whole_image:
            return self._projector_whole_images(point, feats, layouts, crop_start, chosen)
        patch = self.adapter.config.vision_config.patch_size
        groups: dict[tuple, list[int]] = {}
        for i, lay in enumerate(layouts):
            counts = lay["counts"]
            budget, target = self._image_budget(point, lay["total"])
            for c, (b, t) in enumerate(zip(split_budget(budget, counts), split_budget(target, counts))):
                g = crop_start[i] + c
                if b == 0:
                    chosen[g]["keep"] = torch.empty(0, dtype=torch.long, device=feats.device)
                    continue
                groups.setdefault((lay["parts"][c]["grid"], b, t), []).append(g)
        part_of = [layouts[owner[g]]["parts"][g - crop_start[owner[g]]] for g in range(len(owner))]
        try:
            for (grid, b, t), members in groups.items():
                enc_raster = torch.stack([part_of[g]["raster"] for g in members]).to(feats.device)  # [G, n_c]
                idx = torch.tensor(members, device=feats.device)
                tokens = feats[idx[:, None], enc_raster]
                local = torch.arange(enc_raster.shape[1], device=feats.device).expand(len(members), -1)
                store = self._sub_capture(members)
                self._call_budget = (b, t)
                # a fresh generator per call: a crop's draws do not depend on how crops were grouped
                self.generator = new_generator(self.method.seed, feats.device)
                self.grid, self.n_visual = grid, enc_raster.shape[1]
                signals = Signals(
                    {
                        **encoder_signals(self.adapter.tower, store, enc_raster, self.info.feature_layer),
                        "hidden": lambda tokens=tokens: tokens,
                        "projected": lambda tokens=tokens: self.adapter.core.multi_modal_projector(tokens),
                        "projector": lambda: self.adapter.core.multi_modal_projector,
                        "projector_input": lambda tokens=tokens: tokens,
                        "text_embedding": lambda members=members: self._text_embedding_of([owner[g] for g in members]),
                        "pixels": lambda idx=idx, r=enc_raster: _pixel_patches(pixel_values[idx], patch, r),
                    }
                )
                cls_rows = cls_tok[idx] if cls_tok is not None else None
                parts = [
                    self._image_part(point, owner[g], g - crop_start[owner[g]], layouts[owner[g]], r,
                                     tuple(layouts[owner[g]]["counts"]), part_of[g])
                    for g, r in zip(members, enc_raster)
                ]
                red = self.run(point, tokens, local, signals, images=[n_img + g for g in members], cls_token=cls_rows,
                               parts=parts)
                sel = red.selection
                if sel.keep_cls and cls_tok is None:
                    raise RuntimeError(f"method {self.method.name!r} asked to keep CLS, but the tower has none")
                kept = red.tokens(tokens)
                for j, (keep, merged, extra) in enumerate(sel.per_image()):
                    g = members[j]
                    in_llm = merged is not None and sel.merged_space == "projected"
                    chosen[g] = {"keep": keep, "values": kept[j], "projected": merged if in_llm else None,
                                 "extra": extra, "cls": bool(sel.keep_cls)}
        finally:
            self._call_budget = None

    def _projector_whole_images(self, point, feats, layouts, crop_start, chosen) -> None:
        """The projector stage for methods with ``projector_whole_image``: one call per image, on
        its base and un-padded tile tokens in packed order (newlines left out), ``token_index`` the
        llm-stage numbering ``crop * side**2 + raster``. ``cls_attention`` is each crop's own
        (its CLS over its tokens); ``encoder_attention`` / ``encoder_qkv`` span one crop and are
        not offered; a method may not keep CLS or add tokens here."""
        device, n = feats.device, feats.shape[1]
        tower = self.adapter.tower
        try:
            for i, lay in enumerate(layouts):
                crop, raster = lay["seq_crop"].to(device), lay["seq_raster"].to(device)
                tokens = feats[crop_start[i] + crop, raster][None]
                self._call_budget = self._image_budget(point, lay["total"])
                self.generator = new_generator(self.method.seed, device)
                self.grid, self.n_visual = self.image_grids[i], lay["total"]

                def per_crop(name, crop=crop, raster=raster, i=i, lay=lay, **kwargs):
                    out = None
                    for c in range(lay["crops"]):
                        at = (crop == c).nonzero().flatten()
                        store = self._sub_capture([crop_start[i] + c])
                        sig = encoder_signals(tower, store, raster[at][None], self.info.feature_layer)[name](**kwargs)
                        out = sig.new_zeros(*sig.shape[:-1], crop.numel()) if out is None else out
                        out[..., at] = sig
                    return out

                signals = Signals(
                    {
                        "cls_attention": lambda per_crop=per_crop, **kw: per_crop("cls_attention", **kw),
                        "hidden": lambda tokens=tokens: tokens,
                        "projected": lambda tokens=tokens: self.adapter.core.multi_modal_projector(tokens),
                        "projector": lambda: self.adapter.core.multi_modal_projector,
                        "projector_input": lambda tokens=tokens: tokens,
                        "text_embedding": lambda i=i: self._text_embedding_of([i]),
                    }
                )
                red = self.run(point, tokens, (crop * n + raster)[None], signals, images=[i])
                ((keep, merged, _),) = red.selection.per_image()
                in_llm = merged is not None and red.selection.merged_space == "projected"
                kept = red.tokens(tokens)[0]
                for c, part in enumerate(lay["parts"]):
                    mine = (crop[keep] == c).nonzero().flatten()  # in the method's order
                    local = torch.searchsorted(part["raster"].to(device), raster[keep[mine]])
                    chosen[crop_start[i] + c] = {"keep": local, "values": kept[mine], "extra": None, "cls": False,
                                                 "projected": merged[mine] if in_llm else None}
                chosen[crop_start[i]]["order"] = (crop * n + raster)[keep]  # the method's order, for packings without newlines
        finally:
            self._call_budget = None

    def _image_part(self, point: Point, image: int, crop: int, lay: dict, raster: torch.Tensor, sizes: tuple,
                    part: dict | None = None) -> ImagePart:
        """Crop ``crop``'s place in image ``image`` (``ctx.parts``): the image's llm-stage state and
        numbering (``crop * side**2 + raster`` for the row's tower rasters), its budget at
        ``point``, the tokens each crop offers (``sizes``) and, given the crop's un-padded ``part``
        (projector stage), its layout coordinates."""
        budget, target = self._image_budget(point, lay["total"])
        side = self.image_grids[image][1]
        layout = {} if part is None else {
            "layout_index": part["layout_index"].to(raster.device), "layout_grid": part["layout_grid"]}
        return ImagePart(
            state=self.image_states.setdefault(image, {}), index=crop * side * side + raster,
            grid=self.image_grids[image], n=lay["total"], budget=budget, target=target, part=crop, sizes=sizes, **layout,
        )

    def _image_budget(self, point: Point, total: int) -> tuple[int, int]:
        budget = self.plan.budget
        target = budget.resolve_target(total, self.step)
        at = budget.at(point, total, self.step)
        return (target if at is None else at), target

    def _sub_capture(self, members: list[int]) -> EncoderCapture:
        store = EncoderCapture()
        for layer, qkv in self.capture.qkv.items():
            store.qkv[layer] = {k: v[members] for k, v in qkv.items()}
            store.alive[layer] = self.capture.alive[layer][members]
        return store

    def _text_embedding_of(self, images: list[int]):
        emb, mask = self._text_embedding()
        return emb[images], mask[images]

    def _assemble(self, lay: dict, feats: torch.Tensor, cls_tok, first_crop: int, chosen: list[dict], n: int) -> dict:
        """The image's LM-input entries in order: (1) the base image: CLS if kept, its kept tokens
        in the method's order, its extra tokens; (2) the packed part: kept tile tokens and kept
        newlines in slot order (packings without newlines: the kept tile tokens in the packing's
        order); (3) each tile's CLS / extra tokens. A whole-image method under a packing without
        newlines: its kept tokens in its own order instead. Returns the vision-space rows to
        project, where they and the newlines go, and per entry its source slot (-1: none), visual
        flag (everything but newlines) and llm-stage raster id (``crop * n + raster``)."""
        device = feats.device
        k, base_len = lay["crops"], lay["base_len"]
        kept = torch.zeros(k, n, dtype=torch.bool, device=device)
        values = feats.clone()  # vision-space value of each (crop, tower raster); merged where given
        ordered = []
        for c, (part, ch) in enumerate(zip(lay["parts"], chosen)):
            rasters = part["raster"].to(device)
            r = rasters if ch["keep"] is None else rasters[ch["keep"]]
            kept[c, r] = True
            if ch["values"] is not None:
                values[c, r] = ch["values"]
            ordered.append(r)
        none = lambda m: torch.full((m,), -1, dtype=torch.long, device=device)
        rows, src, ids = [], [], []  # vision rows of (1) and (3), with their source slot and raster id

        def specials(c: int, where: str):
            ch = chosen[c]
            if where == "cls" and ch["cls"]:
                rows.append(cls_tok[first_crop + c][None])
                src.append(none(1))
                ids.append(none(1))
            if where == "extra" and ch["extra"] is not None:
                rows.append(ch["extra"].to(feats.dtype))
                src.append(none(ch["extra"].shape[0]))
                ids.append(none(ch["extra"].shape[0]))

        slot_of = lay["slot_of"].to(device)
        emit_nl, n_head = torch.zeros(0, dtype=torch.bool, device=device), 0  # newlines: 'adapter' only
        order = chosen[0].get("order")
        if self.packing != "adapter" and order is not None:  # a whole-image method's order, as it is
            crop, raster = order // n, order % n
            rows.append(values[crop, raster])
            src.append(slot_of[crop, raster])
            ids.append(order)
        else:
            if base_len:
                specials(0, "cls")
                rows.append(values[0, ordered[0]])
                src.append(slot_of[0, ordered[0]])
                ids.append(ordered[0])
                specials(0, "extra")
            n_head = sum(r.shape[0] for r in rows)
            if self.packing == "adapter":  # (2) packed slots: tile tokens (all crops without a base prefix), newlines
                tail = torch.arange(base_len, lay["slots"], device=device)
                crop, raster = lay["crop"].to(device)[tail], lay["raster"].to(device)[tail]
                nl = lay["is_nl"].to(device)[tail]
                tok = kept[crop, raster] & ~nl
                emit = tok
                if bool(nl.any()):
                    row = nl.long().cumsum(0) - nl.long()  # a newline ends its row
                    row_kept = torch.zeros(int(row.max()) + 1, dtype=torch.long, device=device).scatter_add_(0, row, tok.long())
                    emit = tok | (nl & (row_kept[row] > 0))
                slots, emit_nl = tail[emit], nl[emit]
                crop, raster = crop[emit][~emit_nl], raster[emit][~emit_nl]
                src.append(slots)  # every packed entry comes from its own slot (newlines too)
            else:  # (2) the packing's tile sequence (after the base prefix), kept tokens only, no newlines
                crop, raster = lay["seq_crop"][base_len:].to(device), lay["seq_raster"][base_len:].to(device)
                tok = kept[crop, raster]
                crop, raster = crop[tok], raster[tok]
                src.append(slot_of[crop, raster])  # -1: a token of the letterbox padding ('spatial')
            rows.append(values[crop, raster])
            ids.append(crop * n + raster)
            for c in range(1 if base_len else 0, k):
                specials(c, "cls")
                specials(c, "extra")
        count = sum(r.shape[0] for r in rows) + int(emit_nl.sum())
        source = torch.cat(src)
        visual = torch.ones(count, dtype=torch.bool, device=device)
        newline_pos = n_head + emit_nl.nonzero().flatten()
        visual[newline_pos] = False
        vision_pos = visual.nonzero().flatten()  # rows of ``torch.cat(rows)``, in entry order
        return {
            "vision": torch.cat(rows), "vision_pos": vision_pos, "newline_pos": newline_pos, "count": count,
            "source": source, "visual": visual, "raster": torch.cat(ids),
        }

    @staticmethod
    def _llm_space_values(proj: torch.Tensor, lay: dict, entries: dict, chosen: list[dict], n: int) -> torch.Tensor:
        """Merged values a method gave in LLM space (``merged_space="projected"``) replace the
        projections of their kept tokens (matched by llm-stage raster id ``crop * n + raster``;
        tokens cut by un-padding have no row)."""
        given = [(c, part, ch) for c, (part, ch) in enumerate(zip(lay["parts"], chosen)) if ch["projected"] is not None]
        if not given:
            return proj
        ids, proj = entries["raster"].to(proj.device), proj.clone()
        for c, part, ch in given:
            keys = c * n + part["raster"].to(proj.device)[ch["keep"].to(proj.device)]
            hit = ids[None, :] == keys[:, None]  # [kept, rows]
            found = hit.any(1)
            proj[hit[found].float().argmax(1)] = ch["projected"][found].to(proj.dtype)
        return proj

    # -- handed to the decoder's input hook ----------------------------------------------------------
    def _place_image(self, img: PackedImageRecord, row: int, start: int, pos_source: torch.Tensor):
        """As the base class, with newline tokens among the kept slots."""
        device = pos_source.device
        pos_source[row, start : start + img.count] = start + img.source.to(device).clamp(min=0)
        return start + img.visual.to(device).nonzero().flatten(), img.raster.to(device), img.total
