"""DToP: dynamic token pruning by early exit of confident tokens in a plain-ViT segmenter
(arXiv 2308.01045)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..context import ModelInfo, Point, Selection, TokenContext
from ..method import Method, option
from ..registry import register
from ..weights import load_module, save_module

FORMAT = "vlmprune-dtop-heads"
TRAIN = "python -m vlmprune.embedded.vit_training (auxiliary heads of the embedded ViT)"


class ExitHeads(nn.Module):
    """DToP's auxiliary heads: for each block in ``blocks`` a per-token classifier (LayerNorm +
    Linear, a linear decoder) reading that block's raw output; ``heads[str(block)](tokens [B, N,
    C])`` gives class logits ``[B, N, classes]``."""

    def __init__(self, blocks, width: int, classes: int):
        super().__init__()
        self.config = {"blocks": [int(b) for b in blocks], "width": int(width), "classes": int(classes)}
        self.heads = nn.ModuleDict(
            {str(b): nn.Sequential(nn.LayerNorm(width, eps=1e-6), nn.Linear(width, classes)) for b in self.config["blocks"]}
        )

    def forward(self, block: int, tokens: torch.Tensor) -> torch.Tensor:
        return self.heads[str(block)](tokens)

    def save(self, path) -> None:
        save_module(self, path, fmt=FORMAT, method="dtop", config=self.config)

    @classmethod
    def load(cls, path) -> ExitHeads:
        return load_module(path, lambda cfg: cls(**cfg), fmt=FORMAT, method="dtop", kind="a DToP auxiliary-heads", train=TRAIN)

    @classmethod
    def from_seg_heads(cls, heads: dict) -> ExitHeads:
        """From the embedded ViT's committed auxiliary segmentation heads (``{block: SegHead}``)."""
        first = next(iter(heads.values()))
        out = cls(sorted(heads), first.classifier.in_features, first.classifier.out_features)
        for block, head in heads.items():
            out.heads[str(block)][0].load_state_dict(head.norm.state_dict())
            out.heads[str(block)][1].load_state_dict(head.classifier.state_dict())
        return out.eval()


@register
@dataclass
class DToP(Method):
    """DToP (Tang et al., ICCV 2023, arXiv 2308.01045; zbwxp/Dynamic-Token-Pruning, code read:
    ``ViT_prune.forward``, ``PruneHead``).

    After each block in ``blocks`` an auxiliary head predicts every active token's class
    probabilities; a token whose top probability exceeds ``threshold`` (p0) is finished and
    leaves the later blocks, except the ``keep_per_class`` most confident finished tokens of each
    class present, which stay active so later blocks keep context for that class. A finished
    token's prediction is the auxiliary head's logits at its exit; the model's own dense head
    predicts the tokens still active at the end; the map merges both (the adapter writes the
    exit predictions over the dense head's output: ``Selection.exit_outputs``). Counts differ per
    image (per-image keep lists). No budget: ``threshold`` sets the reduction.

    Departures, for per-token linear heads (the embedded ViT's ``easyvqa-seg``) instead of the
    official ATM class-query decoders: the per-token probabilities are a softmax over classes
    (official: class-presence softmax times mask sigmoid); the heads were trained without
    pruning active (official: a pruning-aware fine-tune). ``weights``: an :class:`ExitHeads`, a
    file it saved, or ``{block: head}`` (callables on tokens ``[B, N, C]`` giving ``[B, N, K]``);
    on the embedded ViT the committed auxiliary heads load by default.
    """

    name = "dtop"
    stages = ("vit",)
    roles = ("inside",)
    needs = frozenset({"hidden"})
    uses_budget = False
    training_free = False
    accepts_weights = True
    paper = {"title": "Dynamic Token Pruning in Plain Vision Transformers for Semantic Segmentation", "arxiv": "2308.01045"}

    blocks: tuple = option((5, 7), "0-based blocks after which auxiliary heads sit (official ViT-B out_indices [5, 7]; "
                                   "the last block's head is the model's own)")
    threshold: float = option(0.9, "p0: a token whose top class probability exceeds it finishes (official ViT-B configs; "
                                   "ViT-L 0.95)")
    keep_per_class: int = option(5, "finished tokens of each class kept active, the most confident (hard-coded 5 in the "
                                    "official code)")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"option 'threshold' of method 'dtop' must be in (0, 1], got {self.threshold!r}")
        if self.keep_per_class < 0:
            raise ValueError(f"option 'keep_per_class' of method 'dtop' must be >= 0, got {self.keep_per_class!r}")
        if not self.blocks or any(not isinstance(b, int) or isinstance(b, bool) for b in self.blocks) or list(self.blocks) != sorted(set(self.blocks)):
            raise ValueError(f"option 'blocks' of method 'dtop' must be increasing block indices, got {self.blocks!r}")
        self.heads: ExitHeads | dict | None = None

    def points(self, info: ModelInfo) -> list[Point]:
        """``vit:b+1`` (before block ``b + 1``) for each auxiliary block ``b``; the model must have a
        dense head (its ``vit`` stage restores tokens before it)."""
        spec = info.spec("vit")
        if spec is None or spec.restore != "head":
            raise ValueError(
                "method 'dtop' needs a ViT with a dense (per-token) head, whose stage 'vit' brings every token back "
                "before it (e.g. the embedded ViT with head='seg'); this model has none"
            )
        last = spec.layers.stop - 1
        if any(not 0 <= b < last - 1 for b in self.blocks):
            raise ValueError(f"option 'blocks' of method 'dtop': blocks must lie in [0, {last - 2}] on this "
                             f"{last}-block model (the last block feeds the model's own head), got {self.blocks!r}")
        return [Point("vit", b + 1) for b in self.blocks]

    # -- weights --------------------------------------------------------------------------------
    def load_weights(self, weights) -> None:
        """``weights``: an :class:`ExitHeads`, a path it saved, or ``{block: head}``."""
        if isinstance(weights, (str, Path)):
            weights = ExitHeads.load(weights)
        if isinstance(weights, ExitHeads):
            self.heads = weights.eval()
        elif isinstance(weights, dict) and all(callable(h) for h in weights.values()):
            self.heads = {int(b): h for b, h in weights.items()}
        else:
            raise TypeError(
                "parameter 'weights' of method 'dtop' must be an ExitHeads, a path it saved or {block: head}, "
                f"got {type(weights).__name__}"
            )
        missing = [b for b in self.blocks if b not in self._head_blocks()]
        if missing:
            raise ValueError(f"parameter 'weights' of method 'dtop': no auxiliary head for block(s) {missing} "
                             f"(it has {sorted(self._head_blocks())}; option 'blocks' is {self.blocks})")

    def resolve_weights(self, model) -> None:
        if self.heads is not None:
            return
        if type(model).__name__ == "EmbeddedViT":
            from ..embedded.vit import load_head

            self.load_weights(ExitHeads.from_seg_heads({b: load_head("seg", b) for b in self.blocks}))
            return
        raise ValueError("method 'dtop' needs auxiliary heads for blocks "
                         f"{list(self.blocks)}: pass weights=ExitHeads(...) or {{block: head}} (the embedded ViT ships its own)")

    def _head_blocks(self) -> set[int]:
        return set(self.heads.config["blocks"]) if isinstance(self.heads, ExitHeads) else set(self.heads)

    def _logits(self, block: int, tokens: torch.Tensor) -> torch.Tensor:
        head = self.heads
        return head(block, tokens) if isinstance(head, ExitHeads) else head[block](tokens)

    # -- choosing -------------------------------------------------------------------------------
    def select(self, ctx: TokenContext) -> Selection:
        logits = self._logits(ctx.layer - 1, ctx.tokens)
        conf, label = logits.float().softmax(-1).max(-1)  # [B, N]
        finished = conf > self.threshold
        keep = []
        for i in range(ctx.tokens.shape[0]):
            done = finished[i].clone()
            for y in label[i][done].unique():
                members = (finished[i] & (label[i] == y)).nonzero()[:, 0]
                top = conf[i, members].topk(min(self.keep_per_class, members.numel())).indices
                done[members[top]] = False  # the class's most confident finished tokens stay active
            keep.append((~done).nonzero()[:, 0])
        return Selection(keep=keep, exit_outputs=logits, scores=conf)
