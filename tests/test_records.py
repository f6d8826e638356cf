"""Records that cross files are dataclasses (issue 13, "Rooms"); the dicts users read
(``handle.stats``, the plugin's ``visual_tokens``, the JSON/CSV files) stay as they were."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from tests.tiny import IMAGE_TOKEN, tiny_llava


def test_predictor_visual_tokens_per_question():
    """``Predictor`` hands each question's visual tokens per image to ``evaluate`` and the
    lmms-eval plugin as a :class:`VisualTokens`: planted stats of two images, one question
    holding both, on a 4-layer LLM (pruned to 64 before it, to 32 and 16 before layer 2)."""
    from vlmprune.eval.runner import Predictor, VisualTokens

    pred = Predictor(tiny_llava(), processor=None)
    stats = {
        "points": [{"point": "projector", "in": [256, 256], "out": [64, 64]}, {"point": "llm:2", "in": [64, 64], "out": [32, 16]}],
        "llm_visual_tokens": [64, 64],
    }
    pred.handle = SimpleNamespace(stats=stats)
    ids = torch.tensor([[1] + [IMAGE_TOKEN] * 4])
    # kept: the layer means (64, 64, 32, 32) -> 48 and (64, 64, 16, 16) -> 40, averaged over the two images
    assert pred._tokens(ids, [["a", "b"]]) == [VisualTokens(kept=44.0, final=24.0, llm_input=64.0)]
    assert pred._tokens(ids, [["a"], ["b"]]) == [VisualTokens(48.0, 32.0, 64.0), VisualTokens(40.0, 16.0, 64.0)]
    pred.handle = None  # unwrapped: every placeholder reaches every layer
    ids = torch.tensor([[1] + [IMAGE_TOKEN] * 6, [0, 0, 1] + [IMAGE_TOKEN] * 4])
    assert pred._tokens(ids, [["a", "b"], ["c"]]) == [VisualTokens(3.0, 3.0, 3.0), VisualTokens(4.0, 4.0, 4.0)]
    pred.image_token_id = None
    (nan,) = pred._tokens(ids[:1], [["a"]])
    assert all(math.isnan(v) for v in (nan.kept, nan.final, nan.llm_input))
