"""Scoped method state and steps (issue 13, core v2 move 5): ``ctx.state`` as the forward scope
with ``.forward``, ``.images`` and ``.session``; ``ctx.step`` counting forwards (one per prefill
with images, however many tokens ``generate()`` adds); ``handle.reset()``; budgets that are a
function of the step."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

import vlmprune
from tests.cases import NEXT
from tests.contexts import make_context
from tests.tiny import IMAGE_TOKEN, batch, tiny_llava
from vlmprune import Budget, Method, Point, Selection
from vlmprune.context import State

_MODEL: dict = {}


def model():
    if "m" not in _MODEL:
        _MODEL["m"] = tiny_llava()
    return _MODEL["m"]


@dataclass
class _ScopeProbe(Method):
    """Test-only: acts at encoder:2, the projector and llm:2; keeps ``ctx.budget`` tokens at the
    projector (the first ones) and everything elsewhere; records what each call saw."""

    name = "scope_probe"
    stages = ("encoder", "projector", "llm")

    def __post_init__(self):
        super().__post_init__()
        self.calls: list[dict] = []

    def points(self, info):
        return [Point("encoder", 2), Point("projector"), Point("llm", 2)]

    def select(self, ctx):
        state = ctx.state
        self.calls.append({
            "point": str(ctx.point), "step": ctx.step, "forward_keys": sorted(state), "forward": state.forward,
            "images": list(state.images), "alias": ctx.image_state is state.images, "session": state.session,
            "session_calls": state.session.get("calls", 0), "image_marks": [d.get("mark") for d in state.images],
        })
        state[str(ctx.point)] = True  # the forward scope, indexed like a dict
        for j, d in enumerate(state.images):
            d.setdefault("mark", (ctx.step, j))
        state.session["calls"] = state.session.get("calls", 0) + 1
        b = ctx.tokens.shape[0]
        k = ctx.budget if ctx.stage == "projector" else ctx.n
        return Selection(keep=torch.arange(k).expand(b, -1).clone())


def _generate(m, inputs, **mode):
    return m.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN], **mode)


def _by_point(calls, point):
    return [c for c in calls if c["point"] == point]


@pytest.mark.parametrize("use_cache", [True, False])
def test_scopes_across_points_forwards_and_reset(use_cache):
    m, probe = model(), _ScopeProbe()
    inputs = batch([[10, 11, 12], [20, 21]], seed=1)
    with vlmprune.wrap(m, probe, budget=40) as handle, torch.no_grad():
        for _ in range(3):
            _generate(m, inputs, use_cache=use_cache)
        calls = list(probe.calls)
        handle.reset()
        probe.calls.clear()
        m(**inputs)
        after_reset = list(probe.calls)
    # one generate() is one forward, with or without a cache: the projector chooses once per call
    proj = _by_point(calls, "projector")
    assert [c["step"] for c in proj] == [0, 1, 2]
    assert all(c["step"] == proj[i]["step"] for i in range(3) for c in calls[3 * i : 3 * i + 3])
    assert [c["point"] for c in calls] == ["encoder:2", "projector", "llm:2"] * 3
    for i in range(3):
        enc, pro, llm = calls[3 * i : 3 * i + 3]
        # forward scope: fresh each forward; encoder and projector share it (one group of images)
        assert enc["forward_keys"] == [] and pro["forward_keys"] == ["encoder:2"]
        assert pro["forward"] is enc["forward"]
        # images scope: one dict per image, the same object at every point of the forward
        assert len(enc["images"]) == 2 and all(c["alias"] for c in (enc, pro, llm))
        assert all(a is b is c for a, b, c in zip(enc["images"], pro["images"], llm["images"]))
        assert enc["image_marks"] == [None, None] and llm["image_marks"] == [(i, 0), (i, 1)]
        # session scope: one dict across forwards, counting every earlier call
        assert enc["session"] is calls[0]["session"] and enc["session_calls"] == 3 * i
    assert calls[3]["forward"] is not calls[0]["forward"]
    assert not any(a is b for a in calls[3]["images"] for b in calls[0]["images"])
    # reset: session cleared, steps from 0 again
    assert [c["step"] for c in after_reset] == [0, 0, 0]
    assert after_reset[0]["session_calls"] == 0 and after_reset[0]["session"] is not calls[0]["session"]


def test_a_deepcopy_starts_its_own_session():
    m, probe = model(), _ScopeProbe()
    inputs = batch([[10, 11]], seed=2)
    with vlmprune.wrap(m, probe, budget=40), torch.no_grad():
        m(**inputs)
        m(**inputs)
        twin = copy.deepcopy(m)
        twin_probe = vlmprune.Handle.of(twin).method
        twin(**inputs)
        m(**inputs)
        vlmprune.Handle.of(twin).unwrap()
    assert [c["step"] for c in _by_point(twin_probe.calls, "projector")][-1] == 0
    assert [c["step"] for c in _by_point(probe.calls, "projector")] == [0, 1, 2]


def test_budget_as_a_function_of_the_step():
    m = model()
    inputs = batch([[10, 11, 12], [20, 21]], seed=1)
    counts = {0: 16, 1: 0.25, 2: {"projector": 8, "target": 8}}
    with vlmprune.wrap(m, _ScopeProbe(), budget=lambda step: counts[step]) as handle, torch.no_grad():
        seen = []
        for _ in range(3):
            with handle.record() as records:
                _generate(m, inputs, use_cache=False)
            seen.append(handle.stats["llm_visual_tokens"])
            assert [r.selection.keep.shape[1] for r in records if r.point == Point("projector")] == [seen[-1][0]]
        handle.reset()
        m(**inputs)
        seen.append(handle.stats["llm_visual_tokens"])
    assert seen == [[16, 16], [64, 64], [8, 8], [16, 16]]


def test_step_budget_on_llava_next():
    """LLaVA-NeXT resolves the budget per whole image: at that forward's step too."""
    m = NEXT.model()
    inputs = NEXT.next_batch(NEXT.TEXTS, NEXT.SIZES, seed=5)
    with vlmprune.wrap(m, "uniform", budget=lambda step: [40, 0.5][step]) as handle:
        NEXT.forward(m, inputs)
        first = handle.stats["llm_visual_tokens"]
        NEXT.forward(m, inputs)
    assert first == [40, 40, 40] and handle.stats["llm_visual_tokens"] == [t // 2 for t in NEXT.TOTALS]


@pytest.mark.parametrize("bad,error,shown", [
    (lambda step: 0, ValueError, "returned 0 at step 0"),
    (lambda step: "64", TypeError, "returned '64' at step 0"),
    (lambda step: {"llm:3": 8}, ValueError, r"returned \{'llm:3': 8\} at step 0: budget schedule key 'llm:3'"),
    (lambda step: 1000, ValueError, r"returned 1000 at step 0: .*\[1, 256\]"),
    (lambda step: lambda s: 8, TypeError, "returned <function .*> at step 0: a function of the step must return"),
])
def test_bad_step_budgets_fail_at_wrap(bad, error, shown):
    m = model()
    with pytest.raises(error, match=r"parameter 'budget' \(a function of the step\) " + shown):
        vlmprune.wrap(m, _ScopeProbe(), budget=bad)
    assert vlmprune.Handle.of(m) is None


@pytest.mark.parametrize("later,error,shown", [
    (None, ValueError, "returned None at step 1: budget is required"),
    (1000, ValueError, r"returned 1000 at step 1: budget must be in \[1, 256\]"),
    ({"llm:3": 8}, ValueError, r"returned \{'llm:3': 8\} at step 1: budget schedule key 'llm:3'"),
    (1.5, ValueError, "returned 1.5 at step 1"),
])
def test_bad_step_budgets_fail_at_their_forward(later, error, shown):
    m = model()
    inputs = batch([[10, 11]], seed=2)
    with vlmprune.wrap(m, _ScopeProbe(), budget=lambda step: 32 if step == 0 else later) as handle, torch.no_grad():
        m(**inputs)
        with pytest.raises(error, match=r"parameter 'budget' \(a function of the step\) " + shown):
            m(**inputs)
        handle.reset()  # the model still works: step 0 again
        m(**inputs)
        assert handle.stats["llm_visual_tokens"] == [32]


def test_budget_resolves_per_step():
    b = Budget.parse(lambda step: {0: 16, 1: 0.5}.get(step, {"projector": 4, "llm:2": 2}))
    assert b.per_step is not None and b.resolve_target(64) == 16 and b.at(Point("projector"), 64) is None
    assert b.resolve_target(64, step=1) == 32
    assert b.resolve_target(64, step=5) == 2 and b.at(Point("projector"), 64, step=5) == 4
    assert Budget.parse(b, step=1) == Budget(0.5)
    assert Budget.parse(lambda step: 0.3, rounding="floor").resolve_target(10, step=3) == 3
    with pytest.raises(ValueError, match=r"parameter 'budget' \(a function of the step\) returned 81 at step 1: "):
        Budget.parse(lambda step: 80 * step + 1).resolve_target(64, step=1)


def test_state_by_hand_and_its_alias():
    tokens = torch.randn(2, 6, 4)
    plain = {"score": 1}
    ctx = make_context(tokens, 3, {}, state=plain)
    assert isinstance(ctx.state, State) and ctx.state.forward is plain and ctx.state["score"] == 1
    ctx.state["next"] = 2
    assert plain == {"score": 1, "next": 2} and dict(ctx.state) == plain and ctx.step == 0
    assert ctx.image_state is ctx.state.images and len(ctx.state.images) == 2
    assert [p.state for p in ctx.whole_images()] == ctx.state.images
    assert all(a is b for a, b in zip((p.state for p in ctx.whole_images()), ctx.state.images))
    shared = State(images=[{}, {}])
    with pytest.raises(ValueError, match="image_state is state.images"):
        make_context(tokens, 3, {}, state=shared, image_state=[{}, {}])
