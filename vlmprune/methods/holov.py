"""HoloV: split the visual tokens into crops, share the budget across crops by a holistic
crop score, and pick tokens inside each crop."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import Selection, TokenContext
from ..method import Method, option
from ..primitives.scoring import received_attention
from ..primitives.selection import (
    allocate_budget,
    chunk_groups,
    rank_within_groups,
    tile_groups,
)
from ..registry import register

EPS = 1e-6  # the official code's ``esp``
#: families whose crop count follows the official Qwen2.5-VL port's rule
QWEN_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl"})


def _group_mean(x: torch.Tensor, groups: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` ``[B, N]`` over each group: ``[B, G]``."""
    total = torch.zeros(x.shape[0], sizes.numel(), dtype=x.dtype, device=x.device).index_add_(1, groups, x)
    return total / sizes.clamp_min(1).to(x.dtype)


def similarity_variance(x: torch.Tensor, groups: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """HoloV's diversity term ``[B, N]`` (official ``utils.py``, code-exact): inside each crop,
    the cosine similarities ``S`` of a token to the crop's tokens (diagonal zeroed),
    ``mu_i = sum_j S_ij / (n - 1)`` and ``var_i = sum_j (S_ij - mu_i)^2 / (n - 1)``, the sum
    running over the zeroed diagonal entry too. Crops of fewer than two tokens give 0."""
    f = x.float()
    f = f / (f.norm(dim=-1, keepdim=True) + EPS)
    same = groups[:, None] == groups[None, :]  # [N, N]
    eye = torch.eye(groups.numel(), dtype=torch.bool, device=x.device)
    sim = (f @ f.transpose(1, 2)).masked_fill(~same | eye, 0.0)
    valid = (sizes[groups] - 1).clamp_min(1).to(sim.dtype)  # [N]
    mu = sim.sum(-1) / valid
    var = ((sim - mu.unsqueeze(-1)) ** 2).masked_fill(~same, 0.0).sum(-1) / valid
    return var.masked_fill(sizes[groups] < 2, 0.0)


@register
@dataclass
class HoloV(Method):
    """HoloV (Zou et al., NeurIPS 2025, arXiv 2510.02912; code obananas/HoloV,
    ``llava/model/utils.py::HoloV``). Before the LLM, on the projected tokens.

    ``mode="code"`` (default, what produced the paper's numbers), per image:

    1. the ``N`` tokens are cut into ``crops`` contiguous 1-D chunks of the raster sequence
       (``N // P`` each, the first ``N % P`` one more; ``layout="2d"`` uses 2-D tiles);
    2. per chunk of ``n >= 2`` tokens: ``var`` = :func:`similarity_variance` of the
       post-projector features, ``a' = 1000 a`` (``a``: CLS attention of the feature layer,
       head mean), ``var' = var * mean|a'| / (mean|var| + 1e-6)``, token score
       ``t = a' + alpha var'``, chunk score ``mean(t)``; a one-token chunk scores ``a``;
    3. ``k_c = floor(w_c K)`` with ``w_c = s_c / (sum s + 1e-6)``, the rest one each to
       the chunks of largest ``w`` (:func:`~vlmprune.primitives.allocate_budget`);
    4. a chunk whose ``k_c`` reaches its size is kept whole, in order; otherwise its top
       ``k_c`` by raw attention ``a``, in descending-attention order; chunks in order.

    Because ``var'`` is rescaled per chunk to the chunk's mean ``|a'|``, the chunk score is
    ``(1 + alpha) mean(a')``: in the code the diversity term changes neither the allocation
    nor the in-chunk choice. ``mode="paper"`` is our reading of the paper's intent
    [reconstructed]: the rescale factor is computed once per image (so the diversity term
    keeps its relative size across crops), and the holistic score ``t`` both allocates and
    picks inside crops.

    Deviations from the code: (a) when a chunk is allocated more tokens than it holds, the
    code pads the LLM input with zero vectors up to ``budget``; a zero LLM-space vector cannot
    be expressed here, so ``overflow="drop"`` (default) passes the code's tokens without that
    padding (fewer than ``budget`` then; a budget of every token still keeps every token), and
    ``overflow="redistribute"`` (ours) gives the surplus to the next chunks by weight (exactly
    ``budget`` tokens); (b) the code's ``1e-6``
    in the allocation denominator is ``1e-12`` in the shared allocator (only exact-integer
    shares can differ, and the remainder rule gives them back).

    Crops ``P``: 16 (``num_patches=16`` in the official ``llava_arch.py``, every budget); on
    Qwen2-VL / Qwen2.5-VL the official port's rule ``P = max(1, int(1024/576 * N / keep))`` for
    an image of ``N`` tokens keeping ``keep`` (about 16 at 1/9 kept; 5 and 8 at 33 % and 22 % of
    64). ``crops=P`` fixes it everywhere. A fraction budget becomes a count with ``int(N f)``,
    as the port's ``keep_num = int(image_token_len * prune_rate)`` (the LLaVA code has only
    token counts).

    LLaVA-NeXT (the card's reading of the code): one call over the image's base and un-padded
    tile tokens in packed order, newlines dropped, ``P`` chunks over the whole sequence and the
    image's whole budget (``projector_whole_image``); each token's saliency is its own crop's
    CLS attention; ``layout="2d"`` is refused there (the sequence is no grid). The code's
    ``llava_arch.py`` comments out the newline insertion and hands HoloV's output to the LLM as
    it is: ``next_packing="unpad"`` (default) does the same (no ``image_newline`` tokens, the
    kept tokens in the order of ``order``); ``next_packing="adapter"``: the adapter's general
    rule (base tokens in HoloV's order, tile tokens re-sorted into raster order with a tile
    row's newline kept iff the row keeps a token).

    Parameters
    ----------
    mode : {"code", "paper"}, default "code"
    crops : int, default 0
        ``P``; 0: the official code's (16, or the Qwen port's rule on Qwen-VL; see above).
    layout : {"1d", "2d"}, default "1d"
        Contiguous chunks of the raster order (code) or 2-D tiles of the grid (the paper's
        "spatial crops").
    alpha : float, default 0.09
        Weight of the diversity term (``alpha = 0.09`` in ``utils.py``).
    overflow : {"drop", "redistribute"}, default "drop"
        See deviation (a).
    order : {"code", "raster"}, default "code"
        Order of the kept tokens: the code's (chunk by chunk, descending attention inside a
        partly kept chunk) or raster order.
    saliency : {"auto", "cls", "received"}, default "auto"
        ``"cls"``: CLS -> patch attention of the feature layer (code). ``"received"``: the
        attention each token receives, averaged over heads and all query rows (the card's fix
        for the CLS-free Qwen port). ``"auto"``: cls when the tower has a CLS token.
    next_packing : {"unpad", "adapter"}, default "unpad"
        LLaVA-NeXT only (above): the code's packing (no newlines, HoloV's order), or the adapter's.
    """

    name = "holov"
    stages = ("projector",)
    projector_whole_image = True
    fraction_rounding = "floor"  # the Qwen port's int(image_token_len * prune_rate)
    needs = frozenset({"cls_attention", "encoder_attention", "projected"})
    paper = {
        "title": 'Don\'t Just Chase "Highlighted Tokens" in MLLMs: Revisiting Visual Holistic Context Retention',
        "arxiv": "2510.02912",
    }

    mode: str = option("code", "'code' (official utils.py, what the paper's numbers use) or 'paper' (reconstructed)", choices=("code", "paper"))
    crops: int = option(
        0, "number of crops P; 0: the official code's, 16 (llava_arch.py num_patches) or on Qwen-VL max(1, int(1024/576 * N / keep))"
    )
    layout: str = option("1d", "crops as contiguous raster chunks (code) or 2-D tiles", choices=("1d", "2d"))
    alpha: float = option(0.09, "weight of the similarity-variance term (utils.py: 0.09)")
    overflow: str = option(
        "drop", "surplus of a chunk allocated past its size: dropped (the code's tokens without its zero padding) or to the next chunks (ours)",
        choices=("drop", "redistribute"),
    )
    order: str = option("code", "kept-token order: the code's (chunk, then descending attention) or raster", choices=("code", "raster"))
    saliency: str = option("auto", "cls attention (code), attention received from all rows, or auto", choices=("auto", "cls", "received"))
    next_packing: str = option("unpad", "LLaVA-NeXT: un-padded, no newlines, HoloV's order as it is (code: llava_arch.py) or 'adapter'", choices=("unpad", "adapter"))

    def __post_init__(self):
        super().__post_init__()
        if self.crops < 0:
            raise ValueError(f"option 'crops' of method 'holov' must be >= 1 (0: the official code's count), got {self.crops}")

    def check(self, info):
        if self.saliency == "cls" and not info.has_cls:
            raise ValueError(
                f"method 'holov' with saliency='cls' needs a CLS token, and this model's ({info.family}) vision tower "
                "has none; use saliency='auto' or 'received'"
            )
        super().check(info)

    def needs_for(self, info):
        """CLS attention, or (CLS-free towers such as Qwen-VL's, or saliency="received") the full
        encoder attention."""
        use_cls = self.saliency == "cls" or (self.saliency == "auto" and info.has_cls)
        return type(self).needs - {"encoder_attention" if use_cls else "cls_attention"}

    def crop_count(self, ctx: TokenContext) -> int:
        """``P`` for this call: the option, else 16 or the Qwen port's rule."""
        if self.crops:
            return self.crops
        if ctx.info.family in QWEN_FAMILIES:
            return max(1, int(((1024 / 576) * ctx.n) / ctx.budget))
        return 16

    def groups(self, ctx: TokenContext) -> torch.Tensor:
        n = ctx.n
        crops = min(self.crop_count(ctx), n)
        if self.layout == "1d":
            return chunk_groups(n, crops, device=ctx.tokens.device)
        rows, cols = ctx.grid
        if n != rows * cols:
            raise RuntimeError(f"holov: layout='2d' needs the full {rows}x{cols} token grid, got {n} tokens")
        return tile_groups(torch.arange(n, device=ctx.tokens.device), rows, cols, crops)

    def attention(self, ctx: TokenContext) -> torch.Tensor:
        use_cls = self.saliency == "cls" or (self.saliency == "auto" and ctx.info.has_cls)
        if use_cls:
            return ctx.signals.cls_attention(layer=ctx.info.feature_layer, reduce="mean")
        probs = ctx.signals.encoder_attention(layer=ctx.info.feature_layer)
        return received_attention(probs, skip_first=ctx.info.has_cls)

    def select(self, ctx: TokenContext) -> Selection:
        b, n = ctx.tokens.shape[:2]
        groups = self.groups(ctx)
        n_groups = int(groups.max()) + 1
        sizes = torch.bincount(groups, minlength=n_groups)
        attn = self.attention(ctx).float()
        var = similarity_variance(ctx.signals.projected(), groups, sizes)
        scaled = attn * 1e3
        if self.mode == "code":  # rescale per chunk: the variance term cancels out of the chunk scores
            factor = _group_mean(scaled.abs(), groups, sizes) / (_group_mean(var.abs(), groups, sizes) + EPS)
            token = scaled + self.alpha * var * factor[:, groups]
            single = sizes < 2
            crop = torch.where(single, _group_mean(attn, groups, sizes), _group_mean(token, groups, sizes))
            rank_by = attn
        else:
            factor = scaled.abs().mean(-1, keepdim=True) / (var.abs().mean(-1, keepdim=True) + EPS)
            token = scaled + self.alpha * var * factor
            crop = _group_mean(token, groups, sizes)
            rank_by = token
        capacity = sizes if self.overflow == "redistribute" or ctx.budget >= n else None  # all: keep all
        alloc = allocate_budget(crop, ctx.budget, capacity).minimum(sizes.to(crop.device))  # [B, G]
        rank = rank_within_groups(rank_by, groups)
        mask = rank < alloc.gather(1, groups.expand(b, n))
        keep = []
        for i in range(b):
            idx = mask[i].nonzero().flatten()
            if self.order == "code":
                whole = (alloc[i] >= sizes)[groups[idx]]
                key = groups[idx] * n + torch.where(whole, idx, rank[i, idx])
                idx = idx[torch.argsort(key)]
            keep.append(idx)
        if len({k.numel() for k in keep}) == 1:
            keep = torch.stack(keep)
        return Selection(keep=keep, scores=token)
