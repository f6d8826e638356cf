"""Reliability of the wrapped model as users meet it: fraction rounding per method, concurrent
calls, budgets refused at wrap(), deep copies, weights errors, select timing (issue #12)."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import pytest
import torch

import vlmprune
from vlmprune.budget import Budget
from vlmprune.methods.divprune import DivPrune
from vlmprune.methods.fastv import FastV
from tests.tiny import batch, tiny_llava


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


# -- concurrent calls ----------------------------------------------------------------------------
def _generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, suppress_tokens=[3])


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _in_two_threads(fn, args):
    """``fn(args[i])`` in two threads that start together; results (or the exceptions raised)."""
    out: list = [None, None]
    start = threading.Barrier(2)

    def run(i):
        start.wait()
        try:
            out[i] = fn(args[i])
        except Exception as exc:  # noqa: BLE001 - the test reports it
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_generate_and_forward_give_each_caller_its_own_answer(clip):
    """The issue's case: FastV at 16, two threads with batches of 1 and 3; without the wrap's
    lock they raise or return another call's tokens."""
    inputs = [batch([[5, 6, 7]], seed=1), batch([[8, 9], [10, 11, 12, 13], [14]], seed=2)]
    with vlmprune.wrap(clip, "fastv", budget=16) as handle:
        alone = [_generate(clip, x) for x in inputs]
        alone_logits = [_logits(clip, x) for x in inputs]
        for _ in range(4):
            for got, ref in zip(_in_two_threads(lambda x: _generate(clip, x), inputs), alone):
                assert isinstance(got, torch.Tensor) and torch.equal(got, ref)
            for got, ref in zip(_in_two_threads(lambda x: _logits(clip, x), inputs), alone_logits):
                assert isinstance(got, torch.Tensor) and torch.equal(got, ref)
        assert handle.stats["points"][0]["out"] in ([16], [16, 16, 16])


def test_unwrap_waits_for_a_call_in_flight(clip):
    handle = vlmprune.wrap(clip, "fastv", budget=16)
    in_call, finish = threading.Event(), threading.Event()

    def call_in_flight():
        with handle._lock:  # what a running model(...) / generate() holds
            in_call.set()
            finish.wait(5)

    caller = threading.Thread(target=call_in_flight)
    caller.start()
    in_call.wait(5)
    unwrapper = threading.Thread(target=handle.unwrap)
    unwrapper.start()
    unwrapper.join(0.3)
    assert unwrapper.is_alive() and handle.active and vlmprune.Handle.of(clip) is handle
    finish.set()
    caller.join()
    unwrapper.join(5)
    assert not handle.active and vlmprune.Handle.of(clip) is None


# -- budgets refused at wrap() ---------------------------------------------------------------------
BAD_BUDGETS = [
    (0, ValueError, r"at least 1 token per image, got 0|in \[1, (256|320)\] tokens per image .*got 0"),
    (-5, ValueError, r"at least 1 token per image, got -5|in \[1, (256|320)\] tokens per image .*got -5"),
    (float("nan"), ValueError, r"fraction must be in \(0, 1\], got nan"),
    (float("inf"), ValueError, r"fraction must be in \(0, 1\], got inf"),
    (1.5, ValueError, r"fraction must be in \(0, 1\]"),
    ({"projector": 0}, ValueError, r"budget\[projector\] must be"),
    ({"projector": float("nan")}, ValueError, r"budget\[projector\] as a fraction"),
    ({"projector": "8"}, TypeError, r"budget\[projector\] must be an int"),
    ({"target": -1, "projector": 8}, ValueError, "budget must be"),
]


@pytest.fixture(scope="module")
def dino():
    return tiny_llava("dinov2", "sdpa")


@pytest.mark.parametrize("budget,error,match", BAD_BUDGETS + [
    (10000, ValueError, r"budget must be in \[1, 256\] tokens per image \(the model's config allows at most 256\), got 10000"),
    (257, ValueError, r"in \[1, 256\]"),
])
def test_bad_budget_refused_at_wrap_on_a_dinov2_tower(dino, budget, error, match):
    with pytest.raises(error, match=match):
        vlmprune.wrap(dino, "divprune", budget=budget).unwrap()  # (a wrap that succeeds is undone)
    assert getattr(dino, "_vlmprune_handle", None) is None  # nothing was installed


@pytest.mark.parametrize("budget,kept", [(16, 16), (0.25, 64), ({"projector": 0.5}, 128)])
def test_good_budgets_on_a_dinov2_tower_still_run(dino, budget, kept):
    with vlmprune.wrap(dino, "divprune", budget=budget) as handle:
        with torch.no_grad():
            dino(**batch([[5, 6]]))
        assert handle.stats["points"][0]["out"] == [kept]


@pytest.mark.parametrize("budget,error,match", BAD_BUDGETS[:4] + BAD_BUDGETS[5:] + [
    (10000, ValueError, r"budget must be in \[1, 320\] tokens per image \(the model's config allows at most 320\)"),
    (321, ValueError, r"in \[1, 320\]"),
])
def test_bad_budget_refused_at_wrap_on_llava_next(budget, error, match):
    from tests.cases import NEXT

    with pytest.raises(error, match=match):  # 64 per crop, the base crop and at most 2x2 tiles
        vlmprune.wrap(NEXT.model(), "divprune", budget=budget).unwrap()  # (a wrap that succeeds is undone)


def test_llava_next_budget_of_every_token_of_the_largest_image_is_accepted():
    from tests.cases import NEXT

    # a 64 x 64 image (the largest pinpoint) brings the base crop and 2 x 2 tiles: 5 x 64 tokens
    with vlmprune.wrap(NEXT.model(), "divprune", budget=320) as handle:
        assert handle.budget.target == 320


@pytest.fixture(scope="module")
def qwen():
    from tests.tiny import tiny_qwen

    return tiny_qwen("2")


@pytest.mark.parametrize("budget,error,match", BAD_BUDGETS[:4] + BAD_BUDGETS[5:])
def test_bad_budget_refused_at_wrap_on_qwen(qwen, budget, error, match):
    with pytest.raises(error, match=match):
        vlmprune.wrap(qwen, "divprune", budget=budget).unwrap()  # (a wrap that succeeds is undone)


@pytest.mark.parametrize("budget,method,match", [
    ({"llm:99": 8}, "fastv", r"budget schedule key 'llm:99': method 'fastv' does not prune there; its points are \['llm:2'\]"),
    ({99: 8}, "fastv", r"'llm:99'.*\['llm:2'\]"),
    ({"projector": 8}, "fastv", r"'projector'.*\['llm:2'\]"),
    ({"encoder:1": 8}, "divprune", r"'encoder:1'.*\['projector'\]"),
])
def test_schedule_naming_a_point_the_method_does_not_act_at_is_refused(clip, dino, budget, method, match):
    for model in (clip, dino):
        with pytest.raises(ValueError, match=match):
            vlmprune.wrap(model, method, budget=budget).unwrap()  # (a wrap that succeeds is undone)


# -- copy.deepcopy of a wrapped model ------------------------------------------------------------
def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_deepcopy_of_a_wrapped_model_is_wrapped_on_its_own(family):
    from tests.tiny import qwen_batch, tiny_qwen

    model = tiny_llava("clip") if family == "llava" else tiny_qwen("2")
    inputs = batch([[5, 6, 7], [8, 9]]) if family == "llava" else qwen_batch([[7, 8], [9]], [(4, 4), (4, 6)])
    with torch.no_grad():
        unpruned = model(**inputs).logits
    hooks_unwrapped = _hook_count(model)
    handle = vlmprune.wrap(model, "fastv", budget=3, k_layer=1)
    with torch.no_grad():
        pruned = model(**inputs).logits
    twin = copy.deepcopy(model)
    twin_handle = vlmprune.Handle.of(twin)
    assert twin_handle is not None and twin_handle is not handle and vlmprune.Handle.of(model) is handle
    assert (twin_handle.method.name, twin_handle.method.k_layer, twin_handle.budget) == ("fastv", 1, handle.budget)
    assert twin_handle.method is not handle.method
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(model.parameters(), twin.parameters()))
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, pruned)
    assert twin_handle.stats["prefills"] == 1 and handle.stats["prefills"] == 1  # each its own stats
    handle.unwrap()  # the copy stays wrapped
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, unpruned)
        assert torch.equal(twin(**inputs).logits, pruned)
    twin_handle.unwrap()  # and unwraps exactly
    assert _hook_count(twin) == hooks_unwrapped and not {"forward", "generate", "__deepcopy__"} & set(vars(twin))
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, unpruned)


# -- weights= errors name the parameter --------------------------------------------------------------
def _bad_weight_files(tmp_path):
    from safetensors.torch import save_file

    not_safetensors = tmp_path / "notes.safetensors"
    not_safetensors.write_bytes(b"this is not a safetensors file" * 8)
    no_config = {}
    for method, fmt in (("atp", "vlmprune-atp-heads-1"), ("covipal", "vlmprune-covipal-ppm-1")):
        no_config[method] = tmp_path / f"{method}_no_config.safetensors"
        save_file({"w": torch.zeros(2)}, str(no_config[method]), metadata={"format": fmt, "method": method})
    return not_safetensors, no_config


@pytest.mark.parametrize("method", ["atp", "covipal"])
def test_weights_errors_name_the_parameter(method, tmp_path):
    from safetensors.torch import save_file

    cls = vlmprune.get_method(method)
    not_safetensors, no_config = _bad_weight_files(tmp_path)
    with pytest.raises(ValueError, match=rf"parameter 'weights' of method '{method}' \('.*notes.safetensors'\): not a safetensors file"):
        cls().load_weights(not_safetensors)
    with pytest.raises(ValueError, match=rf"parameter 'weights' of method '{method}' .*lacks a valid 'config' entry"):
        cls().load_weights(no_config[method])
    fmt = {"atp": "vlmprune-atp-heads-1", "covipal": "vlmprune-covipal-ppm-1"}[method]
    config = {"atp": '{"layers": [1, 2], "hidden": 4, "tau": 20.0}', "covipal": '{"dim": 8, "width": 8, "heads": 2}'}[method]
    wrong_state = tmp_path / "wrong_state.safetensors"
    save_file({"w": torch.zeros(2)}, str(wrong_state), metadata={"format": fmt, "method": method, "config": config})
    with pytest.raises(ValueError, match=rf"parameter 'weights' of method '{method}' .*do not build the module"):
        cls().load_weights(wrong_state)


def test_weights_files_round_trip_through_the_shared_helper(tmp_path):
    from vlmprune.methods.atp import ThresholdHeads
    from vlmprune.methods.covipal import PPM

    heads, ppm = ThresholdHeads((1, 2), hidden=4), PPM(8, width=8, heads=2, seed=1)
    with torch.no_grad():
        heads.mlps[1][2].bias.add_(0.25)
    heads.save(tmp_path / "h.safetensors", extra={"steps": 3})
    ppm.save(tmp_path / "p.safetensors")
    heads2, ppm2 = ThresholdHeads.load(tmp_path / "h.safetensors"), PPM.load(tmp_path / "p.safetensors")
    assert heads2.layers == (1, 2) and heads2.training_info == {"steps": 3} and not heads2.training
    assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), heads2.state_dict().values()))
    assert ppm2.cfg == ppm.cfg and all(torch.equal(a, b) for a, b in zip(ppm.state_dict().values(), ppm2.state_dict().values()))
    with pytest.raises(ValueError, match=r"parameter 'weights' of method 'atp' .*: not an ATP threshold-head file \(metadata format 'vlmprune-covipal-ppm-1'"):
        ThresholdHeads.load(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match=r"parameter 'weights' of method 'covipal': the config and state do not build"):
        vlmprune.get_method("covipal")().load_weights(({"dim": 8, "width": 8, "heads": 2}, {"w": torch.zeros(1)}))


# -- select_seconds: honest on CUDA, nothing under torch.compile ------------------------------------
class _FakeClock:
    now = 0.0


class _FakeEvent:
    """Stands in for torch.cuda.Event: records the fake clock's time on a stream."""

    syncs = 0

    def __init__(self):
        self.t, self.stream, self.done = None, None, False

    def record(self, stream):
        self.t, self.stream = _FakeClock.now, stream

    def query(self):
        return self.done

    def synchronize(self):
        _FakeEvent.syncs += 1
        self.done = True

    def elapsed_time(self, end):
        return (end.t - self.t) * 1000.0  # milliseconds, as CUDA events give


def _fake_cuda_timer(monkeypatch):
    from vlmprune.stats import SelectTimer

    monkeypatch.setattr(SelectTimer, "event", staticmethod(_FakeEvent))
    monkeypatch.setattr(SelectTimer, "stream", staticmethod(lambda device: f"stream of {device}"))
    monkeypatch.setattr(_FakeEvent, "syncs", 0)
    monkeypatch.setattr(_FakeClock, "now", 0.0)
    return SelectTimer()


def test_select_timer_on_cuda_records_events_and_waits_only_when_read(monkeypatch):
    timer = _fake_cuda_timer(monkeypatch)
    gpu = torch.device("cuda", 1)
    for seconds in (0.25, 0.5):
        started = timer.start(gpu)
        _FakeClock.now += seconds  # the kernels' time on the device
        timer.stop(started)
        _FakeClock.now += 10.0  # host time between calls is not counted
    assert _FakeEvent.syncs == 0 and [e.stream for pair in timer._pending for e in pair] == ["stream of cuda:1"] * 4
    assert timer.seconds == 0.75 and _FakeEvent.syncs == 2
    timer.reset()
    timer.fold_every, _FakeEvent.syncs = 2, 0
    started = timer.start(gpu)
    _FakeClock.now += 1.0
    timer.stop(started)
    timer._pending[0][1].done = True  # finished on the device
    timer.stop(timer.start(gpu))  # a second pair (not finished): the first folds in without waiting
    assert _FakeEvent.syncs == 0 and len(timer._pending) == 1 and timer._seconds == 1.0


def test_select_timer_under_torch_compile_keeps_the_graph_whole_and_records_nothing():
    from vlmprune.stats import SelectTimer

    timer = SelectTimer()

    def timed(x):
        started = timer.start(x.device)
        y = x * 2 + 1
        timer.stop(started)
        return y

    x = torch.arange(4.0)
    assert torch.equal(torch.compile(timed, backend="eager", fullgraph=True)(x), x * 2 + 1)  # a break would raise
    assert timer.seconds == 0.0
    timed(x)
    assert timer.seconds > 0.0


def test_select_seconds_of_a_wrapped_model_under_a_patched_is_compiling(clip, monkeypatch):
    import vlmprune.stats

    inputs = batch([[5, 6]])
    with vlmprune.wrap(clip, "divprune", budget=16) as handle:
        with torch.no_grad():
            clip(**inputs)
        assert handle.stats["select_seconds"] > 0.0
        handle._stats.select_seconds = 0.0
        monkeypatch.setattr(vlmprune.stats, "is_compiling", lambda: True)
        with torch.no_grad():
            clip(**inputs)
        assert handle.stats["select_seconds"] == 0.0 and handle.stats["points"][0]["out"] == [16]
