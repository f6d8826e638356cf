"""Qwen2-VL / Qwen2.5-VL family tests beyond the conformance kit (tests/test_conformance.py runs
the truth oracles on tests/cases.py's ``QWEN`` cases, 3-D M-RoPE positions rebuilt by hand
there): the budget and position options refused with clear errors."""

from __future__ import annotations

import pytest

import vlmprune
from tests.cases import QWEN


@pytest.mark.parametrize("case", QWEN, ids=lambda case: case.id)
def test_budget_above_the_image_and_compact_positions_refused(case):
    model, inputs = case.model(), case.inputs(2, seed=4)
    with pytest.raises(ValueError, match=r"budget must be in \[1, 48\]"):
        with vlmprune.wrap(model, "divprune", budget=60):
            case.forward(model, inputs)
    with pytest.raises(ValueError, match=r"'positions': the qwen2.*adapter offers \['original'\]"):
        vlmprune.wrap(model, "divprune", budget=8, positions="compact")
    with vlmprune.wrap(model, "divprune", budget=8, positions="original"):  # what it does anyway
        case.forward(model, inputs)
