"""DART: duplication-aware token reduction inside the language model (arXiv 2502.11494)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..context import Point, Selection, TokenContext
from ..method import Method, option
from ..registry import register


@register
@dataclass
class DART(Method):
    """DART (Wen et al., EMNLP 2025, arXiv 2502.11494; ZichenWen1/DART, LLaVA code read through a
    public fork: ``get_retained_image_token``).

    Before LLM layer ``K`` (prefill), pivots are the ``pivot_image_tokens`` image tokens and the
    ``pivot_text_tokens`` text tokens after the image whose keys at layer ``K - 1`` (after RoPE,
    heads concatenated) have the largest L1 norm. Each pivot in turn takes the ``budget // (image
    pivots + text pivots)`` image tokens least cosine-similar to it among those not taken yet,
    comparing the hidden states entering layer ``K`` passed through the LLM's final norm. Kept:
    the image pivots and every token a pivot took, in sequence order, with their original
    positions. No attention weights are read, so any attention kernel stays on.

    As the official code: ``budget`` is its ``max_num_trunction``, so 128 keeps ``4 + 8 * 16 =
    132`` tokens (the image pivots come on top); pivots take their tokens in the order the code
    iterates its Python set of pivot positions (``pivot_order="set"``; ``"index"``: ascending).
    Per image of a batch (the code reads row 0 only); positions are counted from each prompt's
    first real token, so padding changes nothing. A prompt with fewer text tokens after the image
    than ``pivot_text_tokens`` (or an image with fewer tokens than ``pivot_image_tokens``; the
    code fails there) has fewer pivots, and each takes ``budget // pivots`` tokens. Whether the keys are taken before or after RoPE
    is not visible in the code read (a hacked layer output): after RoPE here [unverified].
    """

    name = "dart"
    stages = ("llm",)
    needs = frozenset({"hidden", "instruction_states", "llm_norm"})
    positions = "original"
    paper = {"title": "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
             "arxiv": "2502.11494"}

    k_layer: int = option(2, "pruned layer K (official LLaVA scripts: 2)")
    pivot_image_tokens: int = option(4, "image pivots (official pivot_image_token)")
    pivot_text_tokens: int = option(4, "text pivots (official pivot_text_token)")
    pivot_order: str = option("set", "order in which pivots take tokens: the official code's Python set of positions, "
                                     "or ascending position", choices=("set", "index"))

    def points(self, info):
        if not 1 <= self.k_layer < info.llm_layers:
            raise ValueError(f"option 'k_layer' of method 'dart' must be in [1, {info.llm_layers - 1}], got {self.k_layer}")
        for name in ("pivot_image_tokens", "pivot_text_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"option {name!r} of method 'dart' must be >= 0, got {getattr(self, name)}")
        if self.pivot_image_tokens + self.pivot_text_tokens == 0:
            raise ValueError("options 'pivot_image_tokens' and 'pivot_text_tokens' of method 'dart' cannot both be 0")
        return [Point("llm", self.k_layer)]

    def select(self, ctx: TokenContext) -> Selection:
        norm = ctx.signals.llm_norm()
        states = ctx.signals.instruction_states(layer=self.k_layer - 1)
        keep = []
        for j, s in enumerate(states):
            image = norm(ctx.tokens[j : j + 1])[0].float()
            text = norm(s.text_hidden[None])[0].float()
            n = image.shape[0]
            image_pivots = s.image_keys.float().abs().sum(-1).topk(min(self.pivot_image_tokens, n)).indices
            text_pivots = s.text_keys.float().abs().sum(-1).topk(min(self.pivot_text_tokens, text.shape[0])).indices
            pivots = {int(s.image_places[i]): image[i] for i in image_pivots.tolist()}
            pivots.update({int(s.text_places[i]): text[i] for i in text_pivots.tolist()})
            order = list(set(pivots)) if self.pivot_order == "set" else sorted(pivots)
            per_pivot = ctx.budget // len(pivots)  # the code's budget // (4 + 4) wherever it runs
            free = torch.ones(n, dtype=torch.bool, device=image.device)
            free[image_pivots] = False
            taken = [image_pivots]
            for place in order:
                candidates = free.nonzero().flatten()
                if per_pivot == 0 or candidates.numel() == 0:
                    break
                similarity = F.cosine_similarity(pivots[place][None], image[candidates], dim=-1)
                picked = candidates[(-similarity).topk(min(per_pivot, candidates.numel())).indices]
                free[picked] = False
                taken.append(picked)
            keep.append(torch.cat(taken).sort().values)
        return Selection(keep=keep)
