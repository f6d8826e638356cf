"""HiPrune: anchors from an object-centric middle layer, their neighbours, and registers from
a deep layer, all from vision-encoder self-attention (no CLS, no text)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import equal_split
from ..context import Selection, TokenContext
from ..method import Method, option
from ..primitives.scoring import received_attention
from ..primitives.selection import topk_keep_order
from ..registry import register

#: depth of the tower the README's object layer refers to (CLIP-L/336 of LLaVA-1.5)
REFERENCE_DEPTH = 24
DEFAULT_OBJECT_LAYER = 9
#: README's Qwen2.5-VL row: object layer 16 of the 32-block vision tower (deep = last block)
QWEN_REFERENCE = (16, 32)
QWEN_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl"})


def neighbours(anchors: torch.Tensor, rows: int, cols: int, mode: str) -> torch.Tensor:
    """Mask ``[B, N]`` of the anchors and their 4-neighbours on a ``rows x cols`` raster.

    ``"flat"`` (official code): ``i +- 1`` and ``i +- cols`` on the flat index, clamped to
    ``[0, N - 1]`` (so ``i +- 1`` wraps across rows and out-of-grid ones land on 0 or N-1).
    ``"grid"``: true 2-D neighbours, out-of-grid ones dropped."""
    n = rows * cols
    b = anchors.shape[0]
    mask = torch.zeros(b, n, dtype=torch.bool, device=anchors.device)
    if anchors.numel() == 0:
        return mask
    if mode == "flat":
        cand = torch.cat([anchors, anchors - 1, anchors + 1, anchors - cols, anchors + cols], dim=1).clamp(0, n - 1)
        return mask.scatter_(1, cand, True)
    y, x = anchors // cols, anchors % cols
    for yy, xx in ((y, x - 1), (y, x + 1), (y - 1, x), (y + 1, x)):
        inside = (yy >= 0) & (yy < rows) & (xx >= 0) & (xx < cols)
        mask.scatter_(1, torch.where(inside, yy * cols + xx, anchors), True)  # outside: the anchor itself
    return mask.scatter_(1, anchors, True)


@register
@dataclass
class HiPrune(Method):
    """HiPrune (Liu et al., arXiv 2508.00553; code Danielement321/HiPrune,
    ``LLaVA/llava/model/llava_arch.py::encode_images``), code-exact for LLaVA-1.5.

    Before the projector, from the vision encoder's full self-attention of two layers,
    reduced to the attention each patch *receives* (mean over heads, then over every query
    row, CLS row included; the CLS column dropped when there is one — CLS-free otherwise):

    1. anchors: the top ``round(budget * alpha / 5)`` (Python rounding, half to even) of the
       object layer's received attention;
    2. buffers: each anchor's 4-neighbours (``neighbours="flat"``: the code's flat-index
       ``i +- 1, i +- W`` clamped to the grid, which wraps across rows);
    3. registers: the remaining ``budget - |anchors u buffers|`` slots go to the top received
       attention of the deep layer outside that set.

    Kept tokens are returned in raster order; exactly ``budget`` per image.

    LLaVA-NeXT (the code's anyres path, README budgets 640/320/160 = 5 crops x 128/64/32): every
    crop (base image, each tile) keeps ``int(image budget / crops)`` with steps 1-3 run on it
    alone, whatever the adapter's proportional share. The code hard-codes
    ``mm_patch_merge_type='spatial'`` (``llava_arch.py``), so nothing is un-padded and no
    ``image_newline`` is inserted: ``next_packing="spatial"`` (default) selects on each crop's
    whole grid, letterbox padding included, and the LLM gets the base image's kept tokens, then
    the kept tokens of the joined tile grid row by row, no newlines (an image's tokens are
    ``crops x side**2``; kept ones can lie in the padding; more kept tokens than the prompt's
    placeholders, which count un-padded tokens and newlines, is an error).
    ``next_packing="adapter"``: the adapter's general rule (candidates the un-padded tokens, a
    tile row's newline kept iff the row keeps a token). Either way what a crop cannot take
    (fewer tokens than its share) goes equally to the others
    (:func:`~vlmprune.budget.equal_split`).

    Parameters
    ----------
    alpha : float, default 0.1
        ``HIPRUNE_ALPHA`` (README, all models): share of anchors plus buffers.
    object_layer : int, default 9
        ``HIPRUNE_OBJECT_LAYER`` (README: 9 of LLaVA-1.5's 24-layer CLIP-L, 1-indexed, the
        last of the "middle" layers 5-9; 16 of 32 for Qwen2.5-VL).
    layer_rule : {"scaled", "absolute"}, default "scaled"
        ``"scaled"``: ``object_layer`` refers to a 24-layer tower and becomes
        ``max(1, round(object_layer * L / 24))`` on a tower of depth ``L`` (9 on CLIP-L,
        2 on a 4-layer test tower); on Qwen2-VL / Qwen2.5-VL towers (families ``qwen2_vl``,
        ``qwen2_5_vl``) the README's Qwen row is the reference instead: the default 9 stands
        for its 16 of 32 blocks, ``max(1, round(16 * L / 32))`` (16 on the 32-block tower), and
        another value ``v`` for ``round(v * 16 / 9)`` of 32. ``"absolute"``: used as given.
    deep_layer : int, default 0
        1-indexed layer of the register scores; 0: the feature layer (the code reads
        ``attentions[mm_vision_select_layer]``, the layer whose output LLaVA uses; the Qwen
        code uses the last vision block, which is the Qwen adapter's feature layer).
    neighbours : {"flat", "grid"}, default "flat"
        Buffer arithmetic: the code's flat indices with clamping, or clean 2-D neighbours.
    next_packing : {"spatial", "adapter"}, default "spatial"
        LLaVA-NeXT only (above): the code's ``spatial`` packing, or the adapter's.

    If the anchors and buffers alone exceed the budget (only for ``alpha`` near 1 and tiny
    budgets) the ones with the highest deep-layer attention are kept (ours; the code would fail).

    Qwen2-VL / 2.5-VL, on purpose unlike the official Qwen code: the anchors and buffers are
    always excluded from the register pick (here they rank first by construction). The Qwen
    code subtracts 1 from their deep-layer scores before its top-k, but those scores are sums
    over queries, often above 1, so some anchors and buffers are picked again as registers,
    the duplicates collapse and fewer tokens than the budget are kept. A fraction budget
    becomes ``round(N f)``, as that code's ``round(n_image_tokens * RETAIN)`` (the LLaVA code
    takes a token count).
    """

    name = "hiprune"
    stages = ("projector",)
    needs = frozenset({"encoder_attention"})
    paper = {
        "title": "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models",
        "arxiv": "2508.00553",
    }

    alpha: float = option(0.1, "HIPRUNE_ALPHA, share of anchor + buffer tokens (README: 0.1)")
    object_layer: int = option(9, "HIPRUNE_OBJECT_LAYER, 1-indexed (README: 9 of CLIP-L's 24; on Qwen-VL it stands for 16 of 32)")
    layer_rule: str = option(
        "scaled",
        "'scaled': object_layer refers to a 24-layer tower, round(object_layer * L / 24); 'absolute': as given",
        choices=("scaled", "absolute"),
    )
    deep_layer: int = option(0, "1-indexed register layer; 0 = the feature layer (code: attentions[mm_vision_select_layer])")
    neighbours: str = option("flat", "buffers on the flat index, clamped (code) or true 2-D neighbours", choices=("flat", "grid"))
    next_packing: str = option("spatial", "LLaVA-NeXT: whole crops, no un-padding, no newlines (code: mm_patch_merge_type='spatial') or 'adapter'", choices=("spatial", "adapter"))

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"option 'alpha' of method 'hiprune' must be in [0, 1], got {self.alpha}")
        if self.object_layer < 1 or self.deep_layer < 0:
            raise ValueError("options 'object_layer' (>= 1) and 'deep_layer' (>= 0, 0 = feature layer) of method 'hiprune'")

    def layers(self, info) -> tuple[int, int]:
        """0-based (object layer, deep layer) on this model's tower."""
        depth = info.encoder_layers
        obj = self.object_layer
        if self.layer_rule == "scaled":
            ref_layer, ref_depth = QWEN_REFERENCE if info.family in QWEN_FAMILIES else (DEFAULT_OBJECT_LAYER, REFERENCE_DEPTH)
            obj = max(1, round(obj * ref_layer / DEFAULT_OBJECT_LAYER * depth / ref_depth))
        deep = info.feature_layer + 1 if self.deep_layer == 0 else self.deep_layer
        for opt, value in (("object_layer", obj), ("deep_layer", deep)):
            if not 1 <= value <= depth:
                raise ValueError(f"option {opt!r} of method 'hiprune' gives layer {value}, outside the tower's 1..{depth}")
        return obj - 1, deep - 1

    def check(self, info):
        super().check(info)
        self.layers(info)

    def capture_layers(self, info):
        return {"encoder": tuple(sorted(set(self.layers(info)))), "llm": ()}

    def select(self, ctx: TokenContext) -> Selection:
        rows, cols = ctx.grid
        n = ctx.n
        if n != rows * cols:
            raise RuntimeError(f"hiprune needs the full {rows}x{cols} token grid at the projector, got {n} tokens")
        obj_layer, deep_layer = self.layers(ctx.info)
        skip = ctx.info.has_cls
        g_obj = received_attention(ctx.signals.encoder_attention(layer=obj_layer), skip_first=skip)
        g_deep = received_attention(ctx.signals.encoder_attention(layer=deep_layer), skip_first=skip)
        counts = self.counts(ctx)
        order = torch.sort(g_obj, dim=-1, descending=True, stable=True).indices
        priority = torch.empty_like(g_deep)
        for k in sorted(set(counts)):  # rows sharing a count go together (all of them, but on LLaVA-NeXT)
            rows_k = [j for j, c in enumerate(counts) if c == k]
            chosen = neighbours(order[rows_k, : round(k * self.alpha / 5)], rows, cols, self.neighbours)
            priority[rows_k] = g_deep[rows_k] + 2.0 * chosen  # attention <= 1: anchors and buffers first, then registers
        keep = [topk_keep_order(priority[j : j + 1], k)[0] for j, k in enumerate(counts)]
        if len(set(counts)) == 1:
            keep = torch.stack(keep)
        return Selection(keep=keep, scores=priority)

    def counts(self, ctx: TokenContext) -> list[int]:
        """Tokens each row keeps: the budget, or on LLaVA-NeXT (rows are crops, ``ctx.parts``) the
        code's equal share of the image's budget (:func:`~vlmprune.budget.equal_split`), at least one."""
        if not ctx.parts:
            return [ctx.budget] * ctx.tokens.shape[0]
        return [max(1, equal_split(part.budget, part.sizes)[part.part]) for part in ctx.parts]
