"""AdaToken-3D: progressive pruning by last-instruction-token attention on a calibrated schedule."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..budget import progressive_count_at
from ..context import Point, Selection, TokenContext
from ..method import Method, option, scale_llm_layers
from ..primitives.schedule import check_ratios
from ..primitives.selection import topk_keep_order
from ..registry import register

#: Keys of a schedule file written by ``python -m vlmprune.tools.calibrate_adatoken3d``.
SCHEDULE_KEYS = ("method", "layers", "ratios", "llm_layers", "calibration")


@register
@dataclass
class AdaToken3D(Method):
    """AdaToken-3D (Zhang, Chen, Zhang, arXiv 2505.12782; code junkerman2004/Adatoken-3D,
    ``modeling_llama_pdrop.py`` and ``ATE_inference.py``).

    **Online** (``pdrop_rank_drop``): before each decoder layer ``K`` in ``layers`` (built-in
    ``layer_list=[8,16,24]``, 1-based "after", i.e. before 0-based 8, 16, 24) the image tokens
    are ranked by the attention the last prompt token pays them in layer ``K`` (the next layer
    to run: its own input norm and q/k applied to the current hidden states, RoPE, causal mask,
    softmax over every key, mean over heads) and the top ones are kept in order. The built-in
    schedule keeps ``int(N0 * ratios[t])`` of the ``N0`` original tokens after point ``t``
    (``image_token_ratio_list=[1, 0.5, 0.25, 0.125]``). Layers of a ``layers_of``-layer LLM are
    scaled as ``K -> floor(K L / 32 + 0.5)`` (1, 2, 3 of 4).

    **Offline schedule**: ``schedule`` loads the pruning layers and ratios fitted by
    ``python -m vlmprune.tools.calibrate_adatoken3d`` (attention information flow and the
    exponential-decay fit, for this model; used as given, so the model's depth must match).

    **Budget**: the tokens kept after the last point; earlier counts follow the ratios rescaled
    to it, ``int(ratios[t] * budget / ratios[-1])`` (:func:`vlmprune.budget.progressive_count`):
    ``budget=0.125`` is the built-in schedule, a budget of every token keeps everything. A
    schedule dict ``{"llm:K": count, ...}`` sets counts per point.

    Positions follow the official code: renumbered contiguously after each point, a new token's
    position shifted down by the removed count in the layers after each point
    (``llm_positions = "compact"``; Qwen-VL keeps its 3-D positions).

    **Deviations**: batches of any padding side (official: right padding). Generic image spans (official: LLaVA-3D's
    spatial tokens; its 3-D family comes with that adapter).
    """

    name = "adatoken3d"
    stages = ("llm",)
    needs = frozenset({"text_attention"})
    positions = "original"
    llm_positions = "compact"
    paper = {
        "title": "AdaToken-3D: Dynamic Spatial Gating for Efficient 3D Large Multimodal-Models Reasoning",
        "arxiv": "2505.12782",
    }

    layers: tuple = option((8, 16, 24), "pruning points, before these 0-based decoder layers (built-in layer_list=[8,16,24], 1-based 'after')")
    layers_of: int = option(32, "depth the layers refer to (LLaVA-3D-7B's Vicuna: 32); 0: use them as given")
    ratios: tuple = option((0.5, 0.25, 0.125), "fraction of the original tokens kept after each point (built-in image_token_ratio_list)")
    schedule: str = option("", "JSON file written by python -m vlmprune.tools.calibrate_adatoken3d (layers and ratios fitted for this model)")

    def __post_init__(self):
        super().__post_init__()
        self._depth = None
        if self.schedule:
            self._load_schedule(self.schedule)
        check_ratios(self.name, self.ratios, self.layers)

    def _load_schedule(self, path: str) -> None:
        where = f"option 'schedule' of method 'adatoken3d' ({path!r})"
        try:
            data = json.loads(Path(path).read_text())
        except OSError as err:
            raise ValueError(f"{where}: cannot read the file ({err})") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where}: must hold a JSON object with keys {list(SCHEDULE_KEYS[:4])}")
        missing = [k for k in SCHEDULE_KEYS[:4] if k not in data]
        unknown = sorted(set(data) - set(SCHEDULE_KEYS))
        if missing or unknown:
            raise ValueError(f"{where}: missing keys {missing}, unknown keys {unknown}; valid: {list(SCHEDULE_KEYS)}")
        if data["method"] != self.name:
            raise ValueError(f"{where}: is for method {data['method']!r}, not 'adatoken3d'")
        layers, ratios, depth = data["layers"], data["ratios"], data["llm_layers"]
        if not isinstance(layers, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in layers):
            raise ValueError(f"{where}: 'layers' must be a list of ints, got {layers!r}")
        if not isinstance(ratios, list) or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ratios):
            raise ValueError(f"{where}: 'ratios' must be a list of numbers, got {ratios!r}")
        if not isinstance(depth, int) or depth < 2:
            raise ValueError(f"{where}: 'llm_layers' must be the calibrated model's LLM depth (an int >= 2), got {depth!r}")
        defaults = type(self)()
        for key in ("layers", "ratios", "layers_of"):
            if getattr(self, key) != getattr(defaults, key):
                raise ValueError(f"option {key!r} of method 'adatoken3d' is given both as a keyword and by the schedule {path!r}")
        try:
            check_ratios(self.name, tuple(ratios), tuple(layers))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        self.layers, self.ratios, self.layers_of, self._depth = tuple(layers), tuple(float(r) for r in ratios), 0, depth

    def pruning_layers(self, info) -> tuple[int, ...]:
        if self._depth is not None and self._depth != info.llm_layers:
            raise ValueError(
                f"option 'schedule' of method 'adatoken3d': {self.schedule!r} was calibrated for a {self._depth}-layer LLM, "
                f"this model has {info.llm_layers}; run python -m vlmprune.tools.calibrate_adatoken3d on this model"
            )
        where = f"option 'schedule' of method 'adatoken3d' ({self.schedule!r})" if self.schedule else "option 'layers' of method 'adatoken3d'"
        return scale_llm_layers(self.layers, self.layers_of, info.llm_layers, where, spread=True)

    def points(self, info):
        return [Point("llm", k) for k in self.pruning_layers(info)]

    def capture_layers(self, info):
        return {"encoder": (), "llm": ()}  # the next layer's q/k are projected at the point itself

    def select(self, ctx: TokenContext) -> Selection:
        b, n = ctx.tokens.shape[:2]
        count = progressive_count_at(ctx, self.ratios, self.pruning_layers(ctx.info))
        if count == 0 or n == 0:
            return Selection(keep=torch.empty(b, 0, dtype=torch.long, device=ctx.tokens.device))
        scores = ctx.signals.text_attention(layer=ctx.layer, query="last")
        return Selection(keep=topk_keep_order(scores, count), scores=scores)
