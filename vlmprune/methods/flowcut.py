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


QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
#: where the official code adds the LLM stage (FlowCut_Qwen; the LLaVA-NeXT path)
LLM_STAGE_FAMILIES = QWEN_FAMILIES + ("llava_next",)


@register
@dataclass
class FlowCut(Method):
    """FlowCut (Tong et al., NeurIPS 2025, arXiv 2505.19536; code TungChintao/FlowCut).

    Progressive pruning inside the vision encoder, code-exact for LLaVA-1.5
    (``modeling_clip_flowcut.py``). After every encoder layer ``t`` up to the last pruning
    layer, each surviving patch is scored from that layer's own attention projections:

    - ``a``: CLS -> patch attention (head mean, softmax over all alive tokens, CLS column
      dropped);
    - ``s``: semantic affinity, head mean of ``softmax(v_cls . v_j)`` over all alive tokens
      (no ``1/sqrt(d)``: the code has none in the encoder);
    - ``m``: L1 norm of the head-mean value vector;
    - ``score = (a / sum a + s / sum s) * m``.

    The cumulative score is an EMA, ``C = ema * C + (1 - ema) * score`` (first layer:
    ``C = score``), carried between pruning points in ``ctx.state``. Tokens are removed only
    after layers with an even remaining-layer count ``rpl = S - t - 1`` (so the pruning
    points are ``encoder:S, S-2, ...``): at ``rpl = 0`` down to exactly the encoder's count
    ``K``; otherwise ``r = round((N - K) / sqrt(rpl) * (1 - rho^2))`` tokens, ``rho`` the
    normalised entropy of ``a`` (``H(a) / log(len a)``), never below ``K``. Kept tokens are the
    top ``C`` in original order. LLaVA-1.5 and LLaVA-NeXT: ``S`` is the feature layer
    (``L - 2 = 22`` in the code, here ``ModelInfo.feature_layer``), so layers from ``S`` on run
    on ``K`` patches. LLaVA-1.5 has no LLM stage and ``K`` is the budget (NeXT: below).

    **Qwen2-VL / 2.5-VL** (official ``FlowCut_Qwen``): the relay is the mean query (below),
    ``S`` is the tower's depth (``rpl = depth - t - 1``: the last pruning runs after the last
    block, on the merger's input) and the encoder keeps ``encoder_keep`` times the budget (the
    code: ``8 * target`` patches, i.e. ``2 * target`` merged tokens); a second stage before
    LLM layer ``llm_layer`` (after layer index 1) keeps exactly the budget, scoring each visual
    token with the prompt's last token as the relay (``compute_score_llm``):
    ``rel = mean_h softmax_j(q_last . k_j / sqrt(d))`` and ``sem = mean_h softmax_j(v_last . v_j
    / sqrt(d))``, both over the image's visual tokens only, ``score = (rel + sem) * |mean_h
    v_j|_1`` (the Qwen code adds them un-normalised, the NeXT code normalised: both sum to one,
    so they agree); kept tokens keep their 3-D M-RoPE positions, as in the Qwen code.
    Ours, where the official port differs: the encoder prunes whole 2x2 merge groups (the
    official code prunes single patches before the merger, breaking its 2x2 windows and
    ``cu_seqlens``; card pitfall 7): a group's score and relay attention are the sums over its
    four patches, ``rho`` is the patch-level entropy (``log`` of the patch count), counts are in
    merged tokens; the mean query and the softmax run per image (the code: over the whole
    batch-1 sequence); batches of any size; Qwen2.5-VL follows the same rule (the port covers
    Qwen2-VL); on purpose, the groups kept by the encoder keep their own 3-D M-RoPE positions,
    where the port gives the ``n`` survivors the positions of the first ``n`` image slots
    (``position_ids[:, :, first:first + n]``), so a kept token of the image's last row would
    sit at the top of the image.

    Budgets: the official code takes token counts only (``target_num``); a fraction becomes
    ``round(N f)``.

    **LLaVA-NeXT** (official anyres path): the encoder stage runs per crop (base image, each
    tile) and keeps ``crop_keep`` of the *image's* budget in every crop (the code:
    ``target_num / 2`` each, floored here, at least 1; tokens kept in the letterbox padding are
    then cut by un-padding), the LLM stage before ``llm_layer`` keeps the image's budget with the
    same last-token score (newline tokens are not candidates); from that point on positions are
    renumbered without gaps, as the code does (``llm_positions = "compact"`` there). Ours: at
    decode steps the new token's position is shifted down in the layers from the point on, where
    the code shifts it in every layer (the two before the point hold the unpruned prefix in
    their cache, so the code's first layers see the new token closer than it is);
    ``count="batch_max"`` takes the maximum over the crops the
    adapter runs together (an image's crops with the same budget share: the tiles, and the base
    image alone), where the code takes it over all crops of the batch.
    The code's packing (``next_packing="unpad"``, default): the base image's kept tokens, then the
    kept tile tokens of the un-padded joined tile grid row by row, no ``image_newline`` tokens
    (this code path inserts none); ``next_packing="adapter"``: the adapter's general rule (a tile
    row's newline kept iff the row keeps a token).
    ``llm_stage="on"`` adds the LLM stage on LLaVA-1.5 too (encoder: ``encoder_keep`` times the
    budget).

    Parameters
    ----------
    relay : {"auto", "cls", "mean_query"}, default "auto"
        Who relays the information flow in the encoder. ``"cls"``: the CLS token (LLaVA path
        of the code). ``"mean_query"``: the CLS-free relay of the official Qwen2-VL port:
        ``a = head-mean softmax(mean_q . k / sqrt(d))`` over the patches, ``score = a * m``
        (no semantic term); the card's documented fallback for towers without CLS (SigLIP).
        ``"auto"``: ``"cls"`` when the tower has a CLS token, else ``"mean_query"``.
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
    llm_stage : {"auto", "on", "off"}, default "auto"
        The second stage inside the LLM: ``"auto"`` runs it on Qwen-VL and LLaVA-NeXT (where
        the official code has it), not on LLaVA-1.5.
    encoder_keep : float, default 2.0
        With the LLM stage: tokens the encoder keeps, as a multiple of the budget (Qwen code:
        ``8 * target`` patches = ``2 * target`` merged tokens).
    crop_keep : float, default 0.5
        With the LLM stage, where the encoder stage runs per crop (LLaVA-NeXT): tokens each crop
        keeps, as a fraction of its image's budget (code: ``target_num / 2``).
    llm_layer : int, default 2
        The LLM stage runs before this decoder layer (the code: after layer index 1).
    next_packing : {"unpad", "adapter"}, default "unpad"
        LLaVA-NeXT only (above): the code's packing (no newlines), or the adapter's.

    Budgets: an int or a fraction (the final count); FlowCut sets its own intermediate
    counts, so a per-point schedule is refused.
    """

    name = "flowcut"
    stages = ("encoder", "llm")
    llm_positions = "compact"  # the NeXT code renumbers; Qwen's adapter keeps M-RoPE positions, as its port
    needs = frozenset({"cls_attention", "encoder_qkv", "relay_qkv"})
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
    llm_stage: str = option(
        "auto", "second stage inside the LLM; 'auto': on for Qwen-VL and LLaVA-NeXT (official code)", choices=("auto", "on", "off")
    )
    encoder_keep: float = option(2.0, "with the LLM stage, encoder count as a multiple of the budget (Qwen code: 8*target patches)")
    crop_keep: float = option(0.5, "with the LLM stage on per-crop encoders (LLaVA-NeXT), each crop's count as a fraction of the image budget (code: target_num/2)")
    llm_layer: int = option(2, "the LLM stage runs before this decoder layer (code: after layer index 1)")
    next_packing: str = option("unpad", "LLaVA-NeXT: un-padded, no newlines (code: llava_arch.py) or 'adapter' (newlines)", choices=("unpad", "adapter"))

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"option 'ema' of method 'flowcut' must be in [0, 1), got {self.ema}")
        if self.interval < 1:
            raise ValueError(f"option 'interval' of method 'flowcut' must be >= 1, got {self.interval}")
        if self.encoder_keep < 1.0:
            raise ValueError(f"option 'encoder_keep' of method 'flowcut' must be >= 1, got {self.encoder_keep}")
        if not self.crop_keep > 0.0:
            raise ValueError(f"option 'crop_keep' of method 'flowcut' must be > 0, got {self.crop_keep}")

    # -- plan ------------------------------------------------------------------------------------
    def _qwen(self, info) -> bool:
        return info.family in QWEN_FAMILIES

    def _with_llm(self, info) -> bool:
        return self.llm_stage == "on" or (self.llm_stage == "auto" and info.family in LLM_STAGE_FAMILIES)

    def _last_layer(self, info) -> int:
        """``S`` of ``rpl = S - t - 1``: the tower's depth on Qwen, else the feature layer."""
        return info.encoder_layers if self._qwen(info) else info.feature_layer

    def needs_for(self, info):
        relay = self.relay if self.relay != "auto" else ("cls" if info.has_cls else "mean_query")
        return frozenset(
            {"encoder_qkv"} | ({"cls_attention"} if relay == "cls" else set()) | ({"relay_qkv"} if self._with_llm(info) else set())
        )

    def check(self, info):
        super().check(info)
        if self.relay == "cls" and not info.has_cls:
            raise ValueError(
                f"method 'flowcut' with relay='cls' needs a CLS token, and this model's ({info.family}) vision "
                "tower has none; use relay='auto' or 'mean_query' (the official Qwen port's CLS-free relay)"
            )
        if info.feature_layer < 1:
            raise ValueError("method 'flowcut' prunes between encoder layers and needs a feature layer >= 1")
        if self._with_llm(info) and not 1 <= self.llm_layer < info.llm_layers:
            raise ValueError(
                f"option 'llm_layer' of method 'flowcut' must be in [1, {info.llm_layers - 1}] on this "
                f"{info.llm_layers}-layer LLM, got {self.llm_layer}"
            )

    def points(self, info):
        encoder = [Point("encoder", layer) for layer in sorted(range(self._last_layer(info), 0, -self.interval))]
        return encoder + ([Point("llm", self.llm_layer)] if self._with_llm(info) else [])

    def capture_layers(self, info):
        return {"encoder": tuple(range(self._last_layer(info))), "llm": (self.llm_layer - 1,) if self._with_llm(info) else ()}

    def encoder_per_image(self) -> bool:
        return self.count == "per_image"

    # -- select ------------------------------------------------------------------------------------
    def _relay(self, ctx: TokenContext) -> str:
        if self.relay != "auto":
            return self.relay
        return "cls" if ctx.info.has_cls else "mean_query"

    def layer_score(self, ctx: TokenContext, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(score [B, N], relay attention)`` of encoder ``layer`` for the current tokens; the
        relay attention is per patch (``[B, N * patches_per_token]``, its entropy sets the count)."""
        q, k, v = ctx.signals.encoder_qkv(layer=layer)
        if self._relay(ctx) == "cls":
            relation = ctx.signals.cls_attention(layer=layer, reduce="mean")
            semantic = attention_rows(v[:, :, :1], v, scale=1.0)[:, :, 0, 1:].mean(1)
            return flow_score(relation, value_norm(v[:, :, 1:], p=1), semantic), relation
        off = int(ctx.info.has_cls)  # the relay is the patches' mean query; a CLS token takes no part
        q, k, v = q[:, :, off:], k[:, :, off:], v[:, :, off:]
        relation = attention_rows(q.mean(2, keepdim=True), k)[:, :, 0].mean(1)
        score = flow_score(relation, value_norm(v, p=1))
        return score.view(score.shape[0], ctx.n, -1).sum(-1), relation  # a token's patches summed

    def select(self, ctx: TokenContext) -> Selection:
        if ctx.budget != ctx.target:
            raise ValueError(
                "method 'flowcut' sets its own per-layer counts; give the budget as an int or a fraction "
                "(the final count), not a per-point schedule"
            )
        b, n = ctx.tokens.shape[:2]
        if ctx.stage == "llm":
            return self._select_llm(ctx)
        k = self._encoder_count(ctx)
        state = ctx.state
        if n <= k:  # pruning finished (or nothing to prune): the code skips scoring too
            return Selection(keep=torch.arange(n, device=ctx.tokens.device).expand(b, n).clone())
        score = state.get("score")
        relation = None
        for layer in range(state.get("next_layer", 0), ctx.layer):
            current, relation = self.layer_score(ctx, layer)
            score = current if score is None else self.ema * score + (1.0 - self.ema) * current
        state["next_layer"] = ctx.layer
        rpl = self._last_layer(ctx.info) - ctx.layer
        if rpl == 0:
            counts = torch.full((b,), k, dtype=torch.long)
        else:
            rho = entropy(relation) / math.log(relation.shape[-1])
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

    def _encoder_count(self, ctx: TokenContext) -> int:
        """Tokens each row keeps when the encoder stage is done (see the class docstring)."""
        if not self._with_llm(ctx.info):
            return ctx.target
        if not ctx.parts:
            return min(ctx.n, round(self.encoder_keep * ctx.target))
        targets = {part.target for part in ctx.parts}
        if len(targets) != 1:
            raise RuntimeError("flowcut: the crops of one encoder call belong to images with different budgets")
        return min(ctx.n, max(1, int(self.crop_keep * targets.pop())))

    def _select_llm(self, ctx: TokenContext) -> Selection:
        """The LLM stage: the prompt's last token relays (``compute_score_llm``); keep the budget."""
        b, n = ctx.tokens.shape[:2]
        if n <= ctx.target:
            return Selection(keep=torch.arange(n, device=ctx.tokens.device).expand(b, n).clone())
        q, k, v = ctx.signals.relay_qkv(layer=ctx.layer - 1)
        relation = attention_rows(q[:, :, :1], k[:, :, 1:])[:, :, 0].mean(1)
        semantic = attention_rows(v[:, :, :1], v[:, :, 1:])[:, :, 0].mean(1)
        score = flow_score(relation, value_norm(v[:, :, 1:], p=1), semantic)
        return Selection(keep=topk_keep_order(score, ctx.target), scores=score)
