"""ToP-ViM: token pruning for vision state-space models (Vim)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import progressive_count
from ..context import Point, Selection, TokenContext
from ..method import Method, option, scale_llm_layers
from ..registry import register


@register
@dataclass
class ToPViM(Method):
    """ToP-ViM (Zhan et al., NeurIPS 2024, arXiv 2409.18962; code ZLKong/ToP-ViM, ``models_mamba.py``).

    After blocks 5, 10 and 15 of a 24-block Vim (``layers`` / ``layers_of``, scaled to the
    model's depth) each row keeps its highest-scoring patches in their original scan order and
    the class token is put back in the middle of them (the adapter's ``cls_place="middle"``). The
    score of a token is the backward branch's gated SSM output ``y_b * SiLU(z_b)`` of the block
    just run, summed over channels (signal ``mixer_backward``; ``clip=True``: negative channels
    set to 0 first, the paper's "clipped" metric as third-party summaries describe it [unverified]).

    Counts: the official code keeps ``ceil(0.8 n)`` non-class tokens per point, rounded down to
    an even count so the class token sits exactly in the middle (197 -> 157 -> 125 -> 101 tokens on
    Vim-S). Here the budget fixes the last point's count and the earlier points keep the official
    schedule ``keep_ratio``, ``keep_ratio**2``, ... rescaled to it (:func:`~vlmprune.budget.progressive_count`),
    each rounded down to even; a budget of ``0.8**3`` of the patches (100 of 196) gives the official
    counts, a full budget keeps every token.

    ``code_exact=False`` (default, the paper's intent): the score is flipped back to scan order
    and the class token never competes for a slot (it is not among ``ctx.tokens``).
    ``code_exact=True`` reproduces the released code: the score stays in the backward scan's
    flipped order (position ``j`` is kept for the score of ``n - j``, the image mirrored
    through its centre), and the class token is excluded in batch row 0 only; in another row it can
    win a slot and then appears twice (a kept slot holding its value, through ``Selection.merged``).

    The paper's "pruning-aware hidden state alignment" is in no released code; the Vim adapter's
    option ``alignment="gap_decay"`` is one reading of it [unverified]: the scans after a point
    decay the state over each removed stretch, ``exp((p_j - p_{j-1}) dt A)`` (adapters/mamba.py);
    default ``"none"``, the released code. Not done: the fine-tuning the released scripts run after
    inserting the pruning (this is the training-free application).
    """

    name = "top_vim"
    stages = ("mixer",)  # declared metadata; the points are at the model's ordered stage (the Vim adapter's)
    roles = ("inside",)
    needs = frozenset({"mixer_backward", "cls_position"})
    paper = {"title": "Exploring Token Pruning in Vision State Space Models", "arxiv": "2409.18962"}
    #: the adapter re-centres the class token among the kept patches (the official code's ``cat``)
    cls_place = "middle"

    layers: tuple = option((5, 10, 15), "prune after these blocks of a layers_of-block Vim (official: 5, 10, 15 of 24)")
    layers_of: int = option(24, "the depth `layers` refer to (official Vim-S/T: 24); 0: use them as given")
    keep_ratio: float = option(0.8, "fraction of non-class tokens kept per point in the official schedule (code: 0.8)")
    clip: bool = option(False, "clamp the gated output at 0 before summing (paper's metric per summaries [unverified]; code: no)")
    code_exact: bool = option(False, "reproduce the released code: mirrored score, class token excluded in batch row 0 only")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"option 'keep_ratio' of method 'top_vim' must be in (0, 1], got {self.keep_ratio!r}")
        self.layers = tuple(int(k) for k in self.layers)
        if not self.layers:
            raise ValueError("option 'layers' of method 'top_vim' must name at least one block")

    def pruning_layers(self, info) -> tuple[int, ...]:
        depth = getattr(info, "encoder_layers", 0)
        if not depth:
            raise AttributeError("the model's info gives no depth (encoder_layers)")
        return scale_llm_layers(self.layers, self.layers_of, depth, "option 'layers' of method 'top_vim'", spread=True,
                                model="Vim")

    def points(self, info) -> list[Point]:
        stage = next((name for name, spec in info.stages.items() if spec.ordered), None)
        if stage is None:
            raise AttributeError("no ordered (scan-order) stage")
        return [Point(stage, k) for k in self.pruning_layers(info)]

    def count(self, ctx: TokenContext) -> int:
        """Patches kept at this point (class docstring)."""
        layers = [p.layer for p in self.points(ctx.info)]
        ratios = [self.keep_ratio ** (t + 1) for t in range(len(layers))]
        if ctx.budget != ctx.target:  # a user schedule entry for this point
            k = ctx.budget
        else:
            k = progressive_count(ratios, layers.index(ctx.layer), ctx.target, ctx.n)
        return k if k >= ctx.n else max(1, k - k % 2)

    def select(self, ctx: TokenContext) -> Selection:
        out_b = ctx.signals.mixer_backward()  # [B, L, ED], flipped scan order, class token included
        cls_pos = ctx.signals.cls_position()  # [B]
        b, length = out_b.shape[:2]
        if self.clip:
            out_b = out_b.clamp(min=0)
        score = out_b.sum(-1)  # [B, L]
        if not self.code_exact:
            score = score.flip(1)
        k = self.count(ctx)
        positions = torch.arange(length, device=score.device).expand(b, -1)
        if not self.code_exact:
            patch_scores = score[positions != cls_pos[:, None]].view(b, length - 1)
            keep = patch_scores.topk(k, dim=-1).indices.sort(-1).values
            return Selection(keep=keep, scores=patch_scores)
        return self._code_exact(ctx, score, cls_pos, k)

    def _code_exact(self, ctx: TokenContext, score: torch.Tensor, cls_pos: torch.Tensor, k: int) -> Selection:
        """The released code's choice: top-``k`` of the sequence (class token included) by the
        unflipped score, the class token masked in row 0 only; a row whose top ``k`` holds its
        class token keeps it in a patch slot (a duplicate) and one patch fewer."""
        b = score.shape[0]
        score = score.clone()
        score[0, cls_pos[0]] = float("-inf")
        top = score.topk(k, dim=-1).indices.sort(-1).values  # sequence positions
        keep, merged, dup = [], [], False
        tokens = ctx.tokens
        for i in range(b):
            c = int(cls_pos[i])
            seq = top[i]
            has_cls = bool((seq == c).any())
            patches = seq[seq != c]
            patches = patches - (patches > c).long()  # sequence position -> patch index
            if not has_cls:
                keep.append(patches)
                merged.append(tokens[i, patches])
                continue
            dup = True
            # the row's sequence in order: patches before the class token, its duplicate, the rest
            before = int((seq < c).sum())
            free = torch.ones(ctx.n, dtype=torch.bool, device=seq.device)
            free[patches] = False
            host = int(free.nonzero()[0])  # an index slot for the duplicate (its value comes from merged)
            slots = torch.sort(torch.cat([patches, patches.new_tensor([host])])).values
            values = torch.cat([tokens[i, patches[:before]], ctx.cls_token[i][None], tokens[i, patches[before:]]])
            keep.append(slots)
            merged.append(values)
        keep = torch.stack(keep)
        return Selection(keep=keep, merged=torch.stack(merged) if dup else None)
