"""Reliability of the wrapped model as users meet it: fraction rounding per method, concurrent
calls, budgets refused at wrap(), deep copies, weights errors, select timing (issue #12)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import vlmprune
from vlmprune.budget import Budget
from vlmprune.methods.divprune import DivPrune
from vlmprune.methods.fastv import FastV
from tests.tiny import batch, n_patches, tiny_llava


@pytest.fixture(scope="module")
def clip():
    return tiny_llava("clip", "sdpa")


# -- Method.fraction_rounding -------------------------------------------------------------------
@dataclass
class FloorDivPrune(DivPrune):
    fraction_rounding = "floor"


@dataclass
class FloorFastV(FastV):
    fraction_rounding = "floor"


def test_budget_fraction_rounding_round_or_floor():
    assert Budget.parse(0.3).resolve_target(256) == 77  # round(76.8)
    assert Budget.parse(0.3, rounding="floor").resolve_target(256) == 76  # int(76.8)
    assert Budget.parse(0.001, rounding="floor").resolve_target(256) == 1  # never below one token
    schedule = Budget.parse({"llm:2": 0.3, "llm:3": 0.1}, rounding="floor")
    assert schedule.at(vlmprune.Point("llm", 2), 256) == 76 and schedule.resolve_target(256) == 25
    with pytest.raises(ValueError, match=r"rounding must be one of \['round', 'floor'\]"):
        Budget.parse(0.3, rounding="ceil")


@pytest.mark.parametrize("cls,rounded", [(DivPrune, 77), (FloorDivPrune, 76), (FastV, 77), (FloorFastV, 76)])
def test_wrap_honours_method_fraction_rounding(clip, cls, rounded):
    inputs = batch([[5, 6, 7], [8, 9]])
    with vlmprune.wrap(clip, cls(), budget=0.3) as handle:
        with torch.no_grad():
            clip(**inputs)
        assert [p["out"] for p in handle.stats["points"]] == [[rounded, rounded]]
