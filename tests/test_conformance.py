"""The conformance kit: the truth oracles of DESIGN.md over every adapter case (tests/cases.py)
x every registered method, as the expectation table says (tests/cases.py ``EXPECT``); a case or
row skips only with the reason the table or the case declares. Tiny random models, CPU."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from tests import cases
from tests.cases import CASES, EXPECT, Expect
from tests.truth import Replay, hook_count, record_selections

grid = pytest.mark.parametrize(
    "case,row", [(case, row) for case in CASES for row in cases.rows()], ids=lambda x: x if isinstance(x, str) else x.id
)
_REFERENCES: dict = {}


def expect(case, row: str, oracle: str) -> Expect:
    """The row, or a failure for a registered method without one; skips (with the declared
    reason) where the case or the row says the oracle does not run."""
    spec = EXPECT.get(row)
    if spec is None:
        pytest.fail(f"registered method {row!r} has no expectation row in tests/cases.py EXPECT")
    why = case.restriction(row, oracle) or spec.excluded(oracle, case)
    if why:
        pytest.skip(why)
    return spec


def wrap(case, row: str, oracle: str, budget):
    """Wrap the case's model with the row's method; a method that needs a CLS token on a case
    without one must be refused with a clear error (then the test skips)."""
    spec, model = EXPECT[row], case.model()
    options = case.options(row, oracle)
    if not vlmprune.get_method(spec.method).uses_budget:
        budget = None  # the row's options set the amount (ToMe's r)
    if vlmprune.get_method(spec.method).requires_cls and not case.has_cls:
        with pytest.raises(ValueError, match="needs a CLS token"):
            vlmprune.wrap(model, spec.method, budget=budget, **options)
        pytest.skip(f"{spec.method} needs a CLS token; {case.id} has none (clear error checked)")
    return vlmprune.wrap(model, spec.method, budget=budget, **options)


def reference(case, seed: int = 0, generate: bool = True):
    """Logits (and greedy tokens) of the unwrapped model on ``case.inputs(2, seed)``, computed
    once per case and seed."""
    key = (case.id, seed, generate)
    if key not in _REFERENCES:
        model, inputs = case.model(), case.inputs(2, seed=seed)
        _REFERENCES[key] = (case.forward(model, inputs), case.generate(model, inputs) if generate and case.has_generate else None)
    return _REFERENCES[key]


# 1. keep-all equivalence: forward and generate ---------------------------------------------------
@grid
def test_keep_all_equivalence(case, row):
    spec = expect(case, row, "keep_all")
    model, inputs = case.model(), case.inputs(2, seed=0)
    ref_logits, ref_tokens = reference(case)
    with wrap(case, row, "keep_all", case.full_budget) as handle:
        why = spec.reason("keep_all", case)
        if why:
            pytest.skip(why)
        torch.testing.assert_close(case.forward(model, inputs), ref_logits, atol=1e-5, rtol=0)
        if ref_tokens is not None:
            assert torch.equal(case.generate(model, inputs), ref_tokens)
    assert case.visual_counts(handle) == case.full_counts


# 2. manual equivalence -----------------------------------------------------------------------------
@grid
def test_manual_equivalence(case, row):
    spec = expect(case, row, "manual")
    if spec.reason("manual", case):
        pytest.skip(spec.reason("manual", case))
    model, inputs = case.model(), case.inputs(2, seed=1)
    with wrap(case, row, "manual", case.budget) as handle, record_selections(handle) as seen:
        pruned = case.forward(model, inputs)
    case.manual(model, inputs, handle, list(seen), pruned)


# 3. batch equivalence --------------------------------------------------------------------------------
@grid
def test_batch_equivalence(case, row):
    spec = expect(case, row, "batch")
    if spec.reason("batch", case):
        pytest.skip(spec.reason("batch", case))
    model, inputs = case.model(), case.inputs(case.batch_rows, seed=2)
    with wrap(case, row, "batch", case.budget):
        case.assert_batch_equals_single(model, inputs, seed=2)


# 4. cache equivalence --------------------------------------------------------------------------------
@grid
def test_cache_equivalence(case, row):
    """Cached generate() equals the no-cache greedy loop. A choice made inside the LLM, at several
    points or from the prompt's text (CoViPAL) depends on the prompt, which the loop grows every
    step: the loop replays every choice of the prefill (image by image) where the case can replay
    them all (not NeXT's per-crop encoder points, whose choices read the image only); otherwise
    the loop runs the method itself."""
    expect(case, row, "cache")
    model, inputs = case.model(), case.inputs(2, seed=3)
    with wrap(case, row, "cache", case.budget) as handle, record_selections(handle) as seen:
        cached = case.generate(model, inputs, case.cache_steps)
    seen = list(seen)
    method = handle.method
    replay = len({rec[0] for rec in seen}) > 1 or any(rec[0].stage == "llm" for rec in seen) or "text_embedding" in method.needs
    if replay and case.can_replay(seen):
        handle = vlmprune.wrap(model, Replay(seen, *case.replay_positions(method)), budget=case.budget)
    else:
        handle = wrap(case, row, "cache", case.budget)
    with handle:
        assert torch.equal(case.no_cache(model, inputs, case.cache_steps), cached)


# 5. determinism under the seed (planted examples: tests/test_methods*.py) -------------------------------
@grid
def test_determinism(case, row):
    """Two forwards of the same inputs make the same choices at the same points, and the LLM sees
    fewer visual tokens than the full prompt has (never a silent no-op)."""
    expect(case, row, "determinism")
    model, inputs = case.model(), case.inputs(2, seed=5)
    with wrap(case, row, "determinism", case.budget) as handle:
        runs = []
        for _ in range(2):
            with record_selections(handle) as seen:
                case.forward(model, inputs)
            runs.append([(rec[0], rec[1], rec[2].per_image()) for rec in seen])
        stats = handle.stats
    assert [r[0] for r in runs[0]] == [r[0] for r in runs[1]] and runs[0]
    for (_, index_a, images_a), (_, index_b, images_b) in zip(*runs):
        assert torch.equal(index_a, index_b)
        for (keep_a, merged_a, extra_a), (keep_b, merged_b, extra_b) in zip(images_a, images_b):
            assert torch.equal(keep_a, keep_b)
            assert (merged_a is None) == (merged_b is None) and (merged_a is None or torch.equal(merged_a, merged_b))
            assert (extra_a is None) == (extra_b is None) and (extra_a is None or torch.equal(extra_a, extra_b))
    assert sum(p["out"][j] for p in stats["points"] for j in range(len(p["out"]))) < sum(p["in"][j] for p in stats["points"] for j in range(len(p["in"])))


# 6. unwrap restores ----------------------------------------------------------------------------------
@grid
def test_unwrap_restores(case, row):
    expect(case, row, "unwrap")
    model, inputs = case.model(), case.inputs(2, seed=4)
    ref, _ = reference(case, seed=4, generate=False)  # one reference: every unwrap restores these logits
    before = hook_count(model)  # after a forward: transformers adds its output-capturing hooks at the first one
    handle = wrap(case, row, "unwrap", case.unwrap_budget)
    assert hook_count(model) > before
    pruned = case.forward(model, inputs)
    if case.dense_output:  # every token comes back before a dense head: same shape, other values
        assert pruned.shape == ref.shape and not torch.allclose(pruned, ref)
    else:
        assert pruned.shape[1] < ref.shape[1]
    handle.unwrap()
    assert hook_count(model) == before
    case.assert_unpatched(model)
    torch.testing.assert_close(case.forward(model, inputs), ref, atol=0, rtol=0)
    with vlmprune.wrap(model, "uniform", budget=case.unwrap_budget):
        assert hook_count(model) > before
    assert hook_count(model) == before


# the table against the registry --------------------------------------------------------------------
def test_every_registered_method_has_an_expectation_row():
    assert cases.table_problems() == []
    assert {spec.method for spec in EXPECT.values()} == {entry["name"] for entry in vlmprune.methods()}


def test_a_method_without_a_row_or_a_row_without_a_method_is_reported(monkeypatch):
    """A method registered through the registry's API and missing from the table is reported,
    and becomes a row of every oracle that fails; a row naming an unregistered method too."""
    from vlmprune import registry

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))

    @registry.register
    class Unlisted(vlmprune.Method):
        name = "test_unlisted_method"
        stages = ("projector",)

        def select(self, ctx):
            raise AssertionError("never run")

    assert cases.table_problems() == ["registered method 'test_unlisted_method' has no expectation row in tests/cases.py EXPECT"]
    assert "test_unlisted_method" in cases.rows()
    with pytest.raises(pytest.fail.Exception, match="'test_unlisted_method' has no expectation row"):
        expect(CASES[0], "test_unlisted_method", "keep_all")
    table = {**EXPECT, "ghost": Expect("ghost")}
    assert "expectation row 'ghost' names 'ghost', which is not a registered method" in cases.table_problems(table)


def test_every_skip_reason_is_declared():
    """Every property of every row is True or a non-empty reason, and exceptions name a known
    oracle and family."""
    families = {case.family for case in CASES}
    for row, spec in EXPECT.items():
        for value in (spec.identity_at_full_budget, spec.batch_independent, spec.manual, spec.variants):
            assert value is True or (isinstance(value, str) and value), row
        for (oracle, family), why in spec.skip.items():
            assert oracle in (*cases.ORACLES, "*") and family in families and why, (row, oracle, family)
