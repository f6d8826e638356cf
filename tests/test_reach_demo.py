"""The demo's VLA view (demo/reach_view.py, demo/reach_tab.py) on a tiny reach policy built from a
config: an episode replay shows per step the frame, the kept tokens and the action."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("easy_vqa")

from tests.test_reach import _tiny_llava, _tokenizer_and_processor
from vlmprune.embedded import reach


@pytest.fixture(scope="module")
def tiny():
    from vlmprune.vla import VLAPolicy

    tok, processor = _tokenizer_and_processor()
    policy = VLAPolicy(_tiny_llava(tok), action_dim=2, bins=reach.N_BINS, values=reach.ACTION_VALUES).eval()
    return policy, processor


@pytest.fixture(scope="module")
def uniform_replay(tiny):
    from vlmprune.demo.reach_view import replay

    return replay(*tiny, reach.episodes("test", 1, 0)[0], "uniform", 0.25)


def test_replay_records_each_step_and_matches_the_closed_loop(tiny, uniform_replay):
    from vlmprune.demo.reach_view import replay

    import vlmprune
    from vlmprune.tools.eval_reach import run_episodes

    policy, processor = tiny
    spec = reach.episodes("test", 1, 0)[0]
    rep = uniform_replay
    with vlmprune.wrap(policy, "uniform", budget=0.25) as handle:
        (trace,), _, _ = run_episodes(policy, processor, [spec], handle)
    assert [s.action for s in rep.steps] == trace.actions and rep.success == trace.success
    assert [s.cell for s in rep.steps] == trace.cells[: len(rep.steps)]
    assert all(s.view.grid == (16, 16) and s.view.n_kept == 64 for s in rep.steps)
    # uniform keeps the same evenly spaced patches at every step
    assert len({tuple(np.flatnonzero(s.view.kept)) for s in rep.steps}) == 1
    assert reach.marker_cell(rep.steps[0].frame) == spec.start
    full = replay(policy, processor, spec)
    assert all(s.view.n_kept == 256 for s in full.steps)
    assert "policy" not in vars(policy) and vlmprune.Handle.of(policy) is None  # unwrapped after the replay
    with pytest.raises(ValueError, match="method must be one of"):
        replay(policy, processor, spec, "fastvv", 0.25)


def test_drawing_dims_dropped_tokens_and_captions_the_action(uniform_replay):
    from vlmprune.demo.reach_view import draw_step, episode_text, step_caption

    rep, spec = uniform_replay, uniform_replay.spec
    img = draw_step(rep, 0, width=224)
    assert isinstance(img, Image.Image) and img.size == (224, 224)
    view = rep.steps[0].view
    frame, drawn = np.asarray(rep.steps[0].frame, float), np.asarray(img, float)
    inner = np.zeros((16, 16, 14, 14), dtype=bool)
    inner[:, :, 3:11, 3:11] = True
    inner = inner.transpose(0, 2, 1, 3).reshape(224, 224)  # the middle of every patch
    dropped = np.repeat(np.repeat(view.dropped.reshape(16, 16), 14, 0), 14, 1) & inner
    kept = np.repeat(np.repeat(view.kept.reshape(16, 16), 14, 0), 14, 1) & inner
    assert drawn[dropped].mean() < 0.5 * frame[dropped].mean()  # dimmed (paths and arrows aside)
    assert abs(drawn[kept].mean() - frame[kept].mean()) < 0.15 * frame[kept].mean()
    a = rep.steps[0].action
    assert step_caption(rep, 0).startswith(f"step 0: (dx, dy) = ({a[0]:+d}, {a[1]:+d})")
    assert "tokens 64/256" in step_caption(rep, 0)
    text = episode_text(rep)
    assert spec.instruction in text and "uniform at keep 25 %" in text
    assert ("**success**" in text) == rep.success


def test_app_reach_tab_builds_and_runs(tiny):
    gr = pytest.importorskip("gradio")
    from vlmprune.demo.app import build_app
    from vlmprune.demo.engine import DemoError, ModelStore
    from vlmprune.demo.reach_view import LazyPolicy

    store = ModelStore(loader=lambda spec: (_ for _ in ()).throw(DemoError(f"cannot load {spec}")))
    app = build_app(store=store, samples=[], reach=LazyPolicy(tiny))
    assert any(isinstance(b, gr.Tab) and "VLA" in str(b.label) for b in app.blocks.values())
    run = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "run_reach")
    text, gallery = run(0, "divprune", 12.5)
    assert reach.episodes("test", 1, 0)[0].instruction in text and "divprune at keep 12.5 %" in text
    assert gallery and all(isinstance(im, Image.Image) and "tokens 32/256" in cap for im, cap in gallery)
    text, gallery = run(0, "nope", 25)
    assert text.startswith("⚠") and "method must be one of" in text and gallery == []
