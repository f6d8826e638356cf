"""FlowCut: progressive, information-flow-aware pruning inside the vision encoder."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..context import Point, Selection, TokenContext
from ..method import Method, option
from ..primitives.scoring import attention_rows, entropy, value_norm
from ..primitives.selection import topk_keep_order
from ..registry import register


def flow_score(relation: torch.Tensor, value_l1: torch.Tensor, semantic: torch.Tensor | None = None) -> torch.Tensor:
    """FlowCut's per-layer patch score ``[B, N]`` (official ``compute_score`` /
    ``compute_score_vit``): ``(a / sum(a) + s / sum(s)) * |v|_1`` with a semantic term ``s``,
    ``a * |v|_1`` without one (the CLS-free relay)."""
    if semantic is None:
        return relation * value_l1
    rel = relation / relation.sum(-1, keepdim=True)
    sem = semantic / semantic.sum(-1, keepdim=True)
    return (rel + sem) * value_l1


@register
@dataclass
class FlowCut(Method):
    """FlowCut (Tong et al., NeurIPS 2025, arXiv 2505.19536; code TungChintao/FlowCut).

    Progressive pruning inside the vision encoder, code-exact for LLaVA-1.5
    (``modeling_clip_flowcut.py``). After every encoder layer ``t`` up to the feature layer
    ``S`` (LLaVA-1.5: ``S = L - 2 = 22``, here ``ModelInfo.feature_layer``), each surviving
    patch is scored from that layer's own attention projections:

    - ``a``: CLS -> patch attention (head mean, softmax over all alive tokens, CLS column
      dropped);
    - ``s``: semantic affinity, head mean of ``softmax(v_cls . v_j)`` over all alive tokens
      (no ``1/sqrt(d)``: the code has none in the encoder);
    - ``m``: L1 norm of the head-mean value vector;
    - ``score = (a / sum a + s / sum s) * m``.

    The cumulative score is an EMA, ``C = ema * C + (1 - ema) * score`` (first layer:
    ``C = score``), carried between pruning points in ``ctx.state``. Tokens are removed only
    after layers with an even remaining-layer count ``rpl = S - t - 1`` (so the pruning
    points are ``encoder:S, S-2, ...``): at ``rpl = 0`` down to exactly the budget ``K``;
    otherwise ``r = round((N - K) / sqrt(rpl) * (1 - rho^2))`` patches, ``rho`` the
    normalised entropy of ``a`` (``H(a) / log N``), never below ``K``. Kept patches are the
    top ``C`` in original order; layers after ``S`` run on ``K`` patches and exactly ``K``
    reach the projector.

    The LLaVA-1.5 path has no LLM stage. The code's second stage for LLaVA-NeXT / Qwen2-VL
    (before decoder layer 2, scoring each visual token with the last prompt token's q/k/v,
    softmax over the visual tokens only, with :func:`flow_score`) is not implemented yet: it
    needs an ``llm``-stage signal giving, per image, the q/k/v of its visual tokens and of its
    last prompt token (``llm_qkv`` returns the whole batch's sequences without the image
    positions). Adding it is an ``"llm"`` entry in ``stages``, a ``Point("llm", 2)`` in
    :meth:`points` and a ``ctx.stage == "llm"`` branch in :meth:`select`.

    Parameters
    ----------
    relay : {"auto", "cls", "mean_query"}, default "auto"
        Who relays the information flow. ``"cls"``: the CLS token (LLaVA path of the code).
        ``"mean_query"``: the CLS-free relay of the official Qwen2-VL port
        (``FlowCut_Qwen``): ``a = head-mean softmax(mean_q . k / sqrt(d))`` over the patches,
        ``score = a * m`` (no semantic term); the card's documented fallback for towers
        without CLS (SigLIP). ``"auto"``: ``"cls"`` when the tower has a CLS token, else
        ``"mean_query"``.
    count : {"batch_max", "per_image"}, default "batch_max"
        ``"batch_max"``: the code takes the largest ``r`` over the batch (rows stay
        rectangular, but a batch prunes differently from its images one by one).
        ``"per_image"``: each image its own ``r`` (the paper's intent); the adapter then runs
        the vision tower one image at a time so batch results equal single-image results.
    ema : float, default 0.5
        Weight of the previous cumulative score (hard-wired 0.5 in the code).
    interval : int, default 2
        Prune after layers whose ``rpl`` is a multiple of this (hard-wired "every second
        layer", ``not rpl % 2``, in the code).

    Budgets: an int or a fraction (the final count ``K``); FlowCut sets its own intermediate
    counts, so a per-point schedule is refused.
    """

    name = "flowcut"
    stages = ("encoder",)
    needs = frozenset({"cls_attention", "encoder_qkv"})
    paper = {
        "title": "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models",
        "arxiv": "2505.19536",
    }

    relay: str = option(
        "auto",
        "'cls' (LLaVA code) or 'mean_query' (the Qwen2-VL port's CLS-free relay); 'auto': cls when the tower has one",
        choices=("auto", "cls", "mean_query"),
    )
    count: str = option(
        "batch_max",
        "entropy-adaptive count: the batch maximum (official code) or per image (paper intent)",
        choices=("batch_max", "per_image"),
    )
    ema: float = option(0.5, "EMA weight of the previous cumulative score (code: 0.5)")
    interval: int = option(2, "prune when the remaining-layer count is a multiple of this (code: 2)")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"option 'ema' of method 'flowcut' must be in [0, 1), got {self.ema}")
        if self.interval < 1:
            raise ValueError(f"option 'interval' of method 'flowcut' must be >= 1, got {self.interval}")

    # -- plan ------------------------------------------------------------------------------------
    def check(self, info):
        super().check(info)
        if self.relay == "cls" and not info.has_cls:
            raise ValueError(
                f"method 'flowcut' with relay='cls' needs a CLS token, and this model's ({info.family}) vision "
                "tower has none; use relay='auto' or 'mean_query' (the official Qwen port's CLS-free relay)"
            )
        if info.feature_layer < 1:
            raise ValueError("method 'flowcut' prunes between encoder layers and needs a feature layer >= 1")

    def points(self, info):
        s = info.feature_layer
        return [Point("encoder", layer) for layer in sorted(range(s, 0, -self.interval))]

    def capture_layers(self, info):
        return {"encoder": tuple(range(info.feature_layer)), "llm": ()}

    def encoder_per_image(self) -> bool:
        return self.count == "per_image"

    # -- select ------------------------------------------------------------------------------------
    def _relay(self, ctx: TokenContext) -> str:
        if self.relay != "auto":
            return self.relay
        return "cls" if ctx.info.has_cls else "mean_query"

    def layer_score(self, ctx: TokenContext, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(score, relation attention)``, both ``[B, N]``, of encoder ``layer`` for the current tokens."""
        q, k, v = ctx.signals.encoder_qkv(layer=layer)
        if self._relay(ctx) == "cls":
            relation = ctx.signals.cls_attention(layer=layer, reduce="mean")
            semantic = attention_rows(v[:, :, :1], v, scale=1.0)[:, :, 0, 1:].mean(1)
            return flow_score(relation, value_norm(v[:, :, 1:], p=1), semantic), relation
        off = int(ctx.info.has_cls)  # the relay is the patches' mean query; a CLS token takes no part
        q, k, v = q[:, :, off:], k[:, :, off:], v[:, :, off:]
        relation = attention_rows(q.mean(2, keepdim=True), k)[:, :, 0].mean(1)
        return flow_score(relation, value_norm(v, p=1)), relation

    def select(self, ctx: TokenContext) -> Selection:
        if ctx.budget != ctx.target:
            raise ValueError(
                "method 'flowcut' sets its own per-layer counts; give the budget as an int or a fraction "
                "(the final count), not a per-point schedule"
            )
        b, n = ctx.tokens.shape[:2]
        k = ctx.target
        state = ctx.state
        if n <= k:  # pruning finished (or nothing to prune): the code skips scoring too
            return Selection(keep=torch.arange(n, device=ctx.tokens.device).expand(b, n).clone())
        score = state.get("score")
        relation = None
        for layer in range(state.get("next_layer", 0), ctx.layer):
            current, relation = self.layer_score(ctx, layer)
            score = current if score is None else self.ema * score + (1.0 - self.ema) * current
        state["next_layer"] = ctx.layer
        rpl = ctx.info.feature_layer - ctx.layer
        if rpl == 0:
            counts = torch.full((b,), k, dtype=torch.long)
        else:
            rho = entropy(relation) / math.log(n)
            r = (n - k) / math.sqrt(rpl) * (1.0 - rho**2)
            if self.count == "batch_max":
                r = r.max().expand(b)
            counts = (n - torch.round(r).long()).clamp(k, n).cpu()
        if int(counts.min()) != int(counts.max()):
            raise RuntimeError(
                "flowcut: per-image counts differ within a batch at the encoder stage; the adapter must run "
                "the vision tower one image at a time (encoder_per_image)"
            )
        keep = topk_keep_order(score, int(counts[0]))
        state["score"] = score.gather(1, keep)
        return Selection(keep=keep, scores=score)
