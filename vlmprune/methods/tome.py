"""ToMe: token merging by bipartite soft matching inside every block (arXiv 2210.09461)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..context import ModelInfo, Point, Selection, TokenContext
from ..method import Method, option
from ..primitives.merging import bipartite_soft_matching
from ..registry import register

#: the adapter stage ToMe acts at: inside each block, between attention and MLP
STAGE = "vit_mlp"
#: on a vision Mamba (no attention, no MLP): between blocks, at the model's ordered stage
MIXER = "mixer"


def parse_r(depth: int, r) -> list[int]:
    """Tokens merged in each of ``depth`` blocks, as the official ``tome.utils.parse_r`` reads
    ``model.r``: an int (the same in every block), ``(r, inflection)`` (from
    ``int(r * (1 - inflection))`` rising or falling linearly to ``2r`` minus that, floored per
    block; ``(r, -1)`` is the paper's decreasing schedule) or a list (one per block, padded with
    0). Refuses anything else, naming parameter ``r``."""
    where = "option 'r' of method 'tome'"
    if isinstance(r, list):
        values = list(r)
        if len(values) > depth or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError(f"{where}: a list gives an int >= 0 for each of at most {depth} blocks, got {r!r}")
        return values + [0] * (depth - len(values))
    inflection = 0.0
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"{where}: a tuple is (r, inflection), got {r!r}")
        r, inflection = r
        if isinstance(inflection, bool) or not isinstance(inflection, (int, float)) or not -1 <= inflection <= 1:
            raise ValueError(f"{where}: the inflection of (r, inflection) must be a number in [-1, 1], got {inflection!r}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(
            f"{where} must be an int >= 0 (tokens merged per block), (r, inflection) or a per-block list, got {r!r}"
        )
    low = int(r * (1.0 - inflection))
    high = 2 * r - low
    step = (high - low) / (depth - 1) if depth > 1 else 0.0
    return [int(low + step * i) for i in range(depth)]


def token_counts(n: int, schedule: list[int]) -> list[int]:
    """Patch tokens in each block's attention, ``n`` at the first, when block ``l`` merges
    ``min(schedule[l], tokens // 2)`` (ToMe's cap of half the mergeable tokens; a prefix is never
    merged), plus the count after the last block."""
    counts = [n]
    for r in schedule:
        counts.append(counts[-1] - min(r, counts[-1] // 2))
    return counts


@register
@dataclass
class ToMe(Method):
    """ToMe (Bolya et al., ICLR 2023, arXiv 2210.09461; facebookresearch/ToMe ``tome/patch/timm.py``
    and ``tome/merge.py``, code read).

    In every block with ``r > 0``, between attention and MLP (adapter stage ``vit_mlp``): the
    block's attention keys averaged over heads are the metric; tokens alternate into sets A and B
    over the whole sequence (prefix included, so the split is the official one); each A token's
    most cosine-similar B token is its match and the ``r`` best-matched A tokens are merged into
    their matches as size-weighted means, sizes summed; the output order is ``[unmerged A, all
    B]`` (unmerged A in sequence order when the model has a class token, as the official code
    sorts them; by score otherwise); ``r`` is capped at half the patch tokens. With
    ``prop_attn`` the adapter adds ``log(size)`` to the attention logits of every later block
    (proportional attention). ``r`` takes the forms of the official ``model.r`` (:func:`parse_r`).
    No budget: ``r`` sets the reduction (``wrap(model, "tome", r=8)``).

    The prefix (CLS, registers, a distillation token) is never merged. The official code protects
    the class and distillation tokens only, so on a timm model with register tokens it could merge
    registers; here they stay (the paper's intent: special tokens are not image content).
    Pooling after the tower is the model's own: a CLS head reads the CLS token; timm's average
    pooling takes the plain mean of the merged tokens, as in the official patch.

    On a vision Mamba (the Vim adapter's ordered ``mixer`` stage; our reading, no official code):
    block ``i``'s ``r`` merges after that block, at ``Point("mixer", i + 1)`` (``r`` of the last
    block: after it, before the final norm). A Mamba block has no attention keys, so the metric is
    the hidden state the next block takes in (cosine); sets A and B alternate over the patches in
    scan order (the class token, wherever it sits, is outside them and never merged); merges are
    size-weighted means as above, and every kept token stays at its own place in the scan (a
    merged token at its B destination's), so keep ascends and the merge map is remapped to that
    order. ``prop_attn`` does nothing there (no attention).
    """

    name = "tome"
    stages = (STAGE, MIXER)
    roles = ("inside",)
    needs = frozenset({"encoder_qkv", "hidden", "sizes"})
    uses_budget = False
    paper = {"title": "Token Merging: Your ViT But Faster", "arxiv": "2210.09461"}

    r: Any = option(None, "tokens merged per block: an int, (r, inflection) or a per-block list (the official model.r; "
                          "required)")
    prop_attn: bool = option(True, "proportional attention, log(size) added to attention logits (official default "
                                   "for off-the-shelf models; False for MAE models and training)")

    def __post_init__(self):
        super().__post_init__()
        if self.r is not None:
            parse_r(len(self.r) if isinstance(self.r, list) else 2, self.r)  # the depth is checked at wrap()
        self.proportional_attention = self.prop_attn

    @staticmethod
    def stage(info: ModelInfo) -> str | None:
        """The stage ToMe merges at on this model: ``vit_mlp`` where offered, else an ordered
        (scan-order) stage such as the Vim's ``mixer``; None: neither."""
        if info.spec(STAGE) is not None:
            return STAGE
        return next((name for name, spec in info.stages.items() if spec.ordered), None)

    def schedule(self, info: ModelInfo) -> list[int]:
        """``r`` for each block (:func:`parse_r`): of the ``vit_mlp`` stage, or of the blocks
        before the ordered stage's points."""
        stage = self.stage(info)
        if stage is None:
            raise ValueError(
                f"method 'tome' merges between attention and MLP inside each block (or between the blocks of a vision "
                f"Mamba); the {info.family} adapter offers no such stage (it offers {list(info.stages)}): ToMe runs on "
                "plain ViTs whose anatomy row names the MLP branch (timm, open_clip, transformers ViT/CLIP/SigLIP/DINOv2) "
                "and on the Vim"
            )
        if self.r is None:
            raise ValueError("option 'r' of method 'tome' is required: tokens merged per block, e.g. wrap(model, 'tome', r=8)")
        return parse_r(len(info.spec(stage).layers), self.r)

    def points(self, info: ModelInfo) -> list[Point]:
        """One point per block that merges (``r > 0``)."""
        stage = self.stage(info)
        layers = info.spec(stage).layers if stage is not None else ()
        return [Point(stage, layer) for layer, r in zip(layers, self.schedule(info)) if r > 0]

    def needs_for(self, info: ModelInfo) -> frozenset[str]:
        """The attention keys and sizes in a ViT block; the hidden states and sizes on a Vim."""
        return frozenset({"encoder_qkv" if self.stage(info) == STAGE else "hidden", "sizes"})

    def capture_layers(self, info: ModelInfo) -> dict[str, tuple[int, ...]]:
        """The keys of the block each point sits in (nothing to capture on a Vim)."""
        layers = tuple(p.layer for p in self.points(info)) if self.stage(info) == STAGE else ()
        return {"encoder": (), "llm": (), STAGE: layers}

    def select(self, ctx: TokenContext) -> Selection:
        spec = ctx.info.spec(ctx.stage)
        r = self.schedule(ctx.info)[list(spec.layers).index(ctx.layer)]
        if spec.ordered:
            return self._in_place(ctx, r)
        _, keys, _ = ctx.signals.encoder_qkv()  # [B, H, (CLS) + N, d]: the CLS row first where there is one
        metric = keys[:, :, int(spec.has_cls) :].mean(1)
        merge, provenance, keep = bipartite_soft_matching(metric, r, offset=spec.prefix, sort_unmerged=spec.has_cls)
        merged, _ = merge(ctx.tokens, ctx.signals.sizes())
        return Selection(keep=keep, merged=merged, merge_map=provenance)

    def _in_place(self, ctx: TokenContext, r: int) -> Selection:
        """The merge at an ordered stage: matched on the hidden states, every output slot at its
        token's place in the scan (keep ascending, merged values and merge map in that order)."""
        merge, provenance, keep = bipartite_soft_matching(ctx.signals.hidden(), r)
        merged, _ = merge(ctx.tokens, ctx.signals.sizes())
        order = keep.argsort(-1)
        slot = order.argsort(-1)  # each output slot's place in the ascending order
        merged = merged.gather(1, order[..., None].expand(-1, -1, merged.shape[-1]))
        return Selection(keep=keep.gather(1, order), merged=merged, merge_map=slot.gather(1, provenance))
