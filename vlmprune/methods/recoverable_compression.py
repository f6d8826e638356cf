"""Recoverable Compression: LOF-filtered visual tokens, text-guided recovery, then merging of the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..context import Selection, TokenContext
from ..method import Method, option
from ..primitives.lof import lof_outlier_count
from ..registry import register


def lof_count(scores: torch.Tensor, n_neighbors: int, n_ref: int) -> int:
    """The code's ``int(n_ref * ratio)``, ``ratio`` = the share of LOF outliers among ``scores``
    (``contamination="auto"``) as its float64 ``outlier_count / len``."""
    n = scores.numel()
    return int(n_ref * (lof_outlier_count(scores, n_neighbors) / n)) if n else 0


@register
@dataclass
class RecoverableCompression(Method):
    """Recoverable Compression (Chen et al., AAAI 2025, arXiv 2409.01179; code
    banjiuyufen/Recoverable-Compression, ``token_recycling_with_text_in_vision_and_clustring``),
    training-free, before the projector's output reaches the LLM.

    1. Saliency ``a``: CLS attention of the block after the feature layer (CLIP's last), its q
       and k as one full-width head, ``softmax(q k^T / sqrt(C))``. Without a CLS token (SigLIP,
       Qwen-VL) the mean patch query stands in for it (``saliency="mean_query"``, the CLS-free
       relay of FlowCut's official Qwen port), summed over each token's patches (Qwen's 2x2
       groups; keys: the groups' mean); on Qwen the block is the last one (none follows).
    2. Text score ``s = cos(t, p_i) / sqrt(D)``: the code compares CLIP's text embedding of the
       question with CLIP's projected patches; the model has no CLIP text model, so ``t`` is the
       mean of the LLM input embeddings of the prompt's text (signal ``text_embedding``: the
       whole prompt, not only its first line) and ``p_i`` the projected visual tokens, ``D`` the
       LLM width (the code's 768 is its projection width) [our substitute].
    3. Dynamic scale filter: ``V`` = the ``int(N r)`` most salient tokens, ``r`` the share of
       LOF outliers of ``a`` (``n_neighbors``, contamination "auto"); ``s`` of ``V`` set to
       ``min(s)``; ``T`` = the ``int((N - |V|) r')`` best of it, ``r'`` its outlier share.
       Main tokens: ``V + T`` in original order, unchanged.
    4. On the rest ``R``: ``int(|R| r'')`` centres by ``a`` (``r''``: outlier share of ``a_R``
       with ``recovery_neighbors``), each ``x_i + sum_j a_j x_j`` over its ``merge_topk`` other
       ``R`` tokens with the largest ``cos(k_i, k_j) + text_weight * s_j`` (unnormalised
       weights); one summary token ``sum_j a_j x_j`` over ``R`` minus the centres.

    Output ``[main (original order), centres (rank order), summary]``; positions compact (Qwen:
    each token its own 3-D position, the summary the image's first, as the adapter places it).
    ``merge_map``: a rest token absorbed by several centres is shown with the first in rank order;
    one absorbed by none is only in the summary (-1).

    The code's quirks, reproduced with ``code_exact=True`` (default: the paper's intent): the
    centre count is ``int(C r'')`` with ``C`` the feature width (variable reuse; capped at
    ``|R|``, where the code fails), the keys of ``R`` are read at ``R``-local indices of the full
    key array, and a summary left without centres is dropped. The count adapts per image: the
    budget only caps it (below the method's own count: main tokens by rank, ``V`` before ``T``,
    then centres, one slot kept for the summary; the code has no budget, so a fraction rounds as
    the library default); never fewer than one token.
    """

    name = "recoverable_compression"
    stages = ("projector",)
    needs = frozenset({"encoder_qkv", "projected", "text_embedding"})
    paper = {"title": "Recoverable Compression: A Multimodal Vision Token Recovery Mechanism Guided by Text Information",
             "arxiv": "2409.01179"}

    saliency: str = option(
        "auto", "CLS attention (code) or the mean patch query's (CLS-free towers); auto: cls where the tower has one",
        choices=("auto", "cls", "mean_query"),
    )
    neighbors: int = option(20, "LOF n_neighbors of the visual and text filters (code: k=20)")
    recovery_neighbors: int = option(10, "LOF n_neighbors of the centre count (code: the default k=10)")
    merge_topk: int = option(32, "rest tokens each centre absorbs (code: 32)")
    text_weight: float = option(50.0, "weight of the text score in the centres' similarity (code: 50)")
    code_exact: bool = option(False, "reproduce the code's quirks: width-sized centre count, R-local key indices, lone summary dropped")

    def __post_init__(self):
        super().__post_init__()
        for param in ("neighbors", "recovery_neighbors", "merge_topk"):
            if getattr(self, param) < 1:
                raise ValueError(f"parameter {param!r} of method 'recoverable_compression' must be at least 1, got {getattr(self, param)}")

    def _use_cls(self, has_cls: bool) -> bool:
        return self.saliency == "cls" or (self.saliency == "auto" and has_cls)

    def requires_prefix(self, info) -> bool:
        return self.saliency == "cls"

    def capture_layers(self, info):
        return {"encoder": (self._layer(info),), "llm": ()}

    @staticmethod
    def _layer(info) -> int:
        """The block after the feature layer (CLIP's last, whose q/k the code hooks), or the
        feature layer itself where it is the last block."""
        return min(info.feature_layer + 1, info.encoder_layers - 1)

    def saliency_and_keys(self, ctx: TokenContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a [B, N], keys [B, N, H*D])``: step 1."""
        q, k, _ = ctx.signals.encoder_qkv(layer=self._layer(ctx.info))
        b, h, t, d = q.shape
        q = q.transpose(1, 2).reshape(b, t, h * d).float()
        k = k.transpose(1, 2).reshape(b, t, h * d).float()
        if self._use_cls(ctx.info.has_cls):
            a = ((q[:, :1] @ k.transpose(1, 2)) * (h * d) ** -0.5).softmax(-1)[:, 0, 1:]
            return a, k[:, 1:]
        off = int(ctx.info.has_cls)  # a CLS token takes no part in the mean-query relay
        q, k = q[:, off:], k[:, off:]
        unit = q.shape[1] // ctx.n  # patches per token (Qwen: 4)
        a = ((q.mean(1, keepdim=True) @ k.transpose(1, 2)) * (h * d) ** -0.5).softmax(-1)[:, 0]
        return a.view(b, ctx.n, unit).sum(-1), k.view(b, ctx.n, unit, h * d).mean(2)

    @staticmethod
    def text_score(ctx: TokenContext) -> torch.Tensor:
        """``s [B, N]``: step 2."""
        visual = ctx.signals.projected().float()
        text, mask = ctx.signals.text_embedding()
        mask = mask.to(visual.device)
        text = (text.to(visual.device).float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return (F.normalize(visual, dim=-1) @ F.normalize(text, dim=-1)[..., None])[..., 0] * visual.shape[-1] ** -0.5

    def select(self, ctx: TokenContext) -> Selection:
        a, keys = self.saliency_and_keys(ctx)
        s = self.text_score(ctx)
        b, n = a.shape
        keeps, merged, extras = [], [], []
        merge_map = torch.full((b, n), -1, dtype=torch.long, device=a.device)
        for i in range(b):
            keep, values, extra, absorbed = self._image(ctx.tokens[i], a[i], s[i], keys[i], ctx.budget)
            merge_map[i, absorbed[1]] = absorbed[0]
            keeps.append(keep)
            merged.append(values.to(ctx.tokens.dtype))
            extras.append(extra.to(ctx.tokens.dtype))
        return Selection(keep=keeps, merged=merged, extra=extras, scores=a, merge_map=merge_map)

    def _image(self, x, a, s, keys, budget):
        """One image: ``(keep, values, extra [0 or 1, C], (slots, tokens) of merge_map)``."""
        n = a.numel()
        vis = a.topk(lof_count(a, self.neighbors, n)).indices
        masked = s.clone()
        masked[vis] = s.min()
        txt = masked.topk(lof_count(masked, self.neighbors, n - vis.numel())).indices
        ranked = torch.cat([vis, txt])
        if ranked.numel() < n or budget < n:  # tokens are left: a slot for the summary
            ranked = ranked[: max(budget - 1, 0)]
        main = ranked.sort().values
        is_rest = torch.ones(n, dtype=torch.bool, device=a.device)
        is_rest[main] = False
        rest = is_rest.nonzero().flatten()
        slots = list(range(main.numel())), main.tolist()
        if rest.numel() == 0:
            return main, x[main], x.new_zeros(0, x.shape[-1]), torch.tensor(slots, device=a.device)
        a_r, s_r, x_r = a[rest], s[rest], x[rest].float()
        n_ref = x.shape[-1] if self.code_exact else rest.numel()
        n_c = min(lof_count(a_r, self.recovery_neighbors, n_ref), rest.numel(), max(budget - main.numel() - 1, 0))
        centres = a_r.topk(n_c).indices
        metric = F.normalize((keys[: rest.numel()] if self.code_exact else keys[rest]).float(), dim=-1)
        sim = metric[centres] @ metric.T + self.text_weight * s_r[None]
        sim[torch.arange(n_c, device=a.device), centres] = float("-inf")
        top = sim.topk(min(self.merge_topk, rest.numel() - 1), dim=-1).indices  # [n_c, topk]
        updated = x_r[centres] + (a_r[top, None] * x_r[top]).sum(1)
        others = torch.ones(rest.numel(), dtype=torch.bool, device=a.device)
        others[centres] = False
        extra = (a_r[others, None] * x_r[others]).sum(0, keepdim=True)
        if self.code_exact and n_c == 0 and main.numel() > 0:
            extra = extra[:0]  # the code drops a summary left alone
        if n_c:
            by_centre = torch.zeros(n_c, rest.numel(), dtype=torch.bool, device=a.device)
            by_centre.scatter_(1, top, True)
            hit = (by_centre.any(0) & others).nonzero().flatten()
            first = by_centre.float().argmax(0)  # the first centre (rank order) absorbing each rest token
            slots[0].extend([main.numel() + j for j in range(n_c)] + (main.numel() + first[hit]).tolist())
            slots[1].extend(rest[centres].tolist() + rest[hit].tolist())
        keep = torch.cat([main, rest[centres]])
        values = torch.cat([x[main].float(), updated])
        return keep, values, extra, torch.tensor(slots, dtype=torch.long, device=a.device).view(2, -1)
