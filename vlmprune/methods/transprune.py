"""TransPrune: token transition variation plus instruction-guided attention, progressive in the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import progressive_count_at
from ..context import Point, Selection, TokenContext
from ..method import Method, option, scale_llm_layers
from ..primitives.schedule import check_ratios
from ..primitives.scoring import transition_variation
from ..primitives.selection import topk_keep_order
from ..registry import register


@register
@dataclass
class TransPrune(Method):
    """TransPrune (Li et al., arXiv 2507.20630, CVPR 2026; code liaolea/TransPrune,
    ``modeling_llama_transprune.py``).

    **Token transition variation (TTV)**: in each decoder layer of the accumulation ``band``,
    for the attention and the MLP sub-layer, each token's norm ratio ``||out|| / ||in||`` times
    the softmax over the sequence of its direction change ``1 - cos(in, out)`` (``in``: the
    sub-layer's normalised input, ``out``: its output before the residual add;
    ``direction="signed"``, the official ``compute_transf_weight``; ``"abs"``: the paper's
    ``1 - |cos|``, Eq. 2); attention and MLP weights are added
    (:func:`~vlmprune.primitives.scoring.transition_variation`). At a pruning point before
    layer ``K`` the weights of the band layers that already ran (``< K``) are summed over the
    current image tokens and normalised to sum 1.

    **Instruction-guided attention (IGA)**: the attention the text tokens after the image pay
    each image token in layer ``K`` (the next layer to run: its own input norm and q/k applied
    to the current hidden states, RoPE, causal mask), mean over heads and query rows, normalised
    to sum 1. **Score** ``alpha * TTV + (1 - alpha) * IGA`` (official: ``TTV + IGA``, the
    paper's Eq. 6 with alpha = 0.5); the top tokens are kept in order.

    **Schedule**: pruning before decoder layers ``layers`` (official ``pruning_layer_list=[7,9,12]``
    1-based, i.e. after layers 7, 9, 12 = before 0-based 7, 9, 12) of a ``layers_of``-layer LLM,
    scaled as ``K -> floor(K L / 32 + 0.5)`` with collisions spread apart (1, 2, 3 of 4); the
    band defaults to the layers from ``layers[0] - 1`` to ``layers[-1] - 1`` (official
    ``accmulating_layer_list=[7..12]``, 1-based). After point ``t`` the official code keeps
    ``int(N0 * ratios[t])`` of the ``N0`` original tokens (``image_token_ratio_list``: 504, 360,
    72 of 576). **Budget**: the tokens kept after the last point; the earlier counts follow the
    ratios rescaled to it, ``int(ratios[t] * budget / ratios[-1])``
    (:func:`vlmprune.budget.progressive_count`): ``budget=0.125`` is the official schedule, a
    budget of every token keeps everything. A schedule dict ``{"llm:K": count, ...}`` sets
    counts per point.

    Positions follow the official code: renumbered contiguously after each point, and a new
    token's position shifted down by the tokens each point removed in the layers after it
    (``llm_positions = "compact"``; Qwen-VL keeps its 3-D positions).

    **Deviations**: the TTV
    softmax runs per sample over its real tokens (official: one softmax over every token of the
    batch, meant for batch 1). Batches with padding of any side (official: right padding only).
    """

    name = "transprune"
    stages = ("llm",)
    needs = frozenset({"sublayer_io", "text_attention"})
    positions = "original"
    llm_positions = "compact"
    paper = {"title": "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model", "arxiv": "2507.20630"}

    layers: tuple = option((7, 9, 12), "pruning points, before these 0-based decoder layers (official pruning_layer_list=[7,9,12], 1-based 'after')")
    layers_of: int = option(32, "depth the layers refer to (LLaVA-1.5-7B: 32); 0: use them as given")
    ratios: tuple = option((0.875, 0.625, 0.125), "fraction of the original tokens kept after each point (official image_token_ratio_list)")
    band: tuple = option((), "0-based layers whose transitions accumulate, as given; (): layers[0]-1 .. layers[-1]-1 (official 7..12, 1-based)")
    direction: str = option("signed", "direction change: 1 - cos (official code) or 1 - |cos| (paper, Eq. 2)", choices=("signed", "abs"))
    alpha: float = option(0.5, "weight of TTV against IGA (paper Eq. 6: 0.5; the official code adds them unweighted)")

    def __post_init__(self):
        super().__post_init__()
        check_ratios(self.name, self.ratios, self.layers)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"option 'alpha' of method 'transprune' must be in [0, 1], got {self.alpha}")

    def pruning_layers(self, info) -> tuple[int, ...]:
        return scale_llm_layers(self.layers, self.layers_of, info.llm_layers, "option 'layers' of method 'transprune'", spread=True)

    def band_layers(self, info) -> tuple[int, ...]:
        if not self.band:
            points = self.pruning_layers(info)
            return tuple(range(points[0] - 1, points[-1]))
        if any(not 0 <= layer < info.llm_layers for layer in self.band):
            raise ValueError(f"option 'band' of method 'transprune' must list layers in [0, {info.llm_layers - 1}], got {self.band!r}")
        return tuple(sorted(set(self.band)))

    def points(self, info):
        return [Point("llm", k) for k in self.pruning_layers(info)]

    def capture_layers(self, info):
        last = self.pruning_layers(info)[-1]
        return {"encoder": (), "llm": (), "sublayer_io": tuple(layer for layer in self.band_layers(info) if layer < last)}

    def ttv(self, ctx: TokenContext) -> torch.Tensor:
        """Accumulated transition variation of the current image tokens, normalised ``[B, N]``."""
        total = ctx.tokens.new_zeros(ctx.tokens.shape[:2], dtype=torch.float32)
        for layer in self.band_layers(ctx.info):
            if layer >= ctx.layer:
                continue
            io = ctx.signals.sublayer_io(layer=layer)
            weight = transition_variation(io.attn_in, io.attn_out, io.valid, self.direction)
            weight = weight + transition_variation(io.mlp_in, io.mlp_out, io.valid, self.direction)
            total = total + weight.gather(1, io.visual)
        return total / (total.sum(dim=-1, keepdim=True) + 1e-8)

    def select(self, ctx: TokenContext) -> Selection:
        b, n = ctx.tokens.shape[:2]
        count = progressive_count_at(ctx, self.ratios, self.pruning_layers(ctx.info))
        if count == 0 or n == 0:
            return Selection(keep=torch.empty(b, 0, dtype=torch.long, device=ctx.tokens.device))
        iga = ctx.signals.text_attention(layer=ctx.layer, query="instruction").float()
        iga = iga / (iga.sum(dim=-1, keepdim=True) + 1e-8)
        scores = self.alpha * self.ttv(ctx) + (1 - self.alpha) * iga
        return Selection(keep=topk_keep_order(scores, count), scores=scores)
