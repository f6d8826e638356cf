"""The demo's Vim view (demo/vim_view.py, demo/vim_tab.py) without a browser: colour and shape
read from the 24-class head, the tokens alive after each point equal to the recorded keep (ToP-ViM's
three points, a boundary method's one, ToMe's merge groups after every block), errors as
messages, and the app's Vim tab run end to end. The model is a tiny random
:class:`~vlmprune.embedded.vim_model.VimClassifier` (16 px, 4x4 patches, 4 blocks, 24 classes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from vlmprune.demo.engine import DemoError
from vlmprune.demo.vim_view import (
    LazyVim,
    VimDemoModel,
    VimSetting,
    prediction_text,
    result_text,
    vim_prediction,
    vim_wrap_options,
)
from vlmprune.demo.vit_view import group_labels

pytest.importorskip("mambapy")


@pytest.fixture(scope="module")
def tiny():
    from vlmprune.embedded.vim_model import VimClassifier, VimConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = VimClassifier(VimConfig(image_size=16, patch_size=4, d_model=16, depth=4, d_state=4, num_classes=24))
    try:
        yield VimDemoModel(model, name="tiny")
    finally:
        torch.set_num_threads(threads)


def _image(seed: int = 0, side: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8), "RGB")


def test_prediction_sums_each_label_over_the_other():
    """Class 0 (red circle) is the single most likely class (0.3), but green (classes 3-5) holds
    0.6 of the mass: colour green 0.6, shape circle 0.3 + 0.2 = 0.5."""
    p = torch.full((24,), 1e-9)
    p[0], p[3], p[4], p[5] = 0.3, 0.2, 0.2, 0.2
    p[23] = 1 - p.sum() + p[23]
    logits = p.log()[None]
    pred = vim_prediction(logits)
    assert pred["colour"][0] == "green" and pred["colour"][1] == pytest.approx(0.6, abs=1e-5)
    assert pred["shape"][0] == "circle" and pred["shape"][1] == pytest.approx(0.5, abs=1e-5)
    assert "✓ same as unpruned" in prediction_text(logits, logits)
    other = torch.zeros(1, 24)
    other[0, 23] = 9.0  # yellow triangle
    assert "✗ differs from unpruned" in prediction_text(other, logits) and "**yellow**" in prediction_text(other)


@pytest.mark.parametrize(
    "method,setting,points",
    [("top_vim", VimSetting(budget=4), ["mixer:1", "mixer:2", "mixer:3"]),
     ("divprune", VimSetting(budget=6, boundary_layer=1), ["mixer:1"]),
     ("uniform", VimSetting(budget=6), ["mixer:2"])],
)
def test_kept_tokens_after_each_point_equal_the_recorded_keep(tiny, method, setting, points):
    res = tiny.run(_image(), method, setting)
    assert res.ok, res.error
    assert [p for p, _ in res.views] == points
    alive = np.arange(16)
    for rec, (_, view) in zip(res.records, res.views):
        alive = rec.token_index[0][rec.selection.keep[0]].numpy()
        assert sorted(np.flatnonzero(view.kept)) == sorted(alive)
        assert not view.merged.any()
    assert alive.size == setting.budget


def test_tome_groups_partition_the_patches_into_the_final_tokens(tiny):
    """r=2 on 16 patches: a point after each of the 4 blocks (16 -> 14 -> 12 -> 10 -> 8); every
    patch is in exactly one of the final 8 tokens, and the grouped patches are the merged ones."""
    res = tiny.run(_image(1), "tome", VimSetting(r=2))
    assert res.ok, res.error
    assert [p for p, _ in res.views] == ["mixer:1", "mixer:2", "mixer:3", "mixer:4"]
    final = res.final
    assert (final.owner >= 0).all() and np.unique(final.owner).size == 8
    labels = group_labels(final)
    assert (labels >= 0).sum() == 16 - (np.bincount(final.owner, minlength=16) == 1).sum()


def test_wrap_options_and_errors_come_back_as_messages(tiny):
    assert vim_wrap_options("tome", VimSetting(r=3)) == {"r": 3}
    assert vim_wrap_options("top_vim", VimSetting(budget=8)) == {"budget": 8}
    assert vim_wrap_options("random", VimSetting(budget=8, boundary_layer=2)) == {"budget": 8, "boundary_layer": 2}
    with pytest.raises(DemoError, match="method must be one of top_vim, tome"):
        vim_wrap_options("fastv", VimSetting())
    assert "method must be one of" in tiny.run(_image(), "dtop").error
    assert "budget" in tiny.run(_image(), "uniform", VimSetting(budget=99)).error
    with pytest.raises(DemoError):
        tiny.run(None)


def test_result_text_reports_points_load_and_time(tiny):
    base = tiny.run(_image())
    res = tiny.run(_image(), "uniform", VimSetting(budget=8, boundary_layer=2))
    text = result_text(res, tiny, base)
    assert "8 tokens at mixer:2" in text and "after the last point: **8** of 16" in text
    assert "mixer:2 16→8" in text and "colour: **" in text and "unpruned" in text
    # blocks 0, 1 on 17 tokens, blocks 2, 3 on 9: 52 / 68
    assert f"tokens through the blocks: {round(100 * 52 / 68)} % of unpruned" in text
    assert "16** patch tokens" in result_text(base, tiny)


def test_app_vim_tab_builds_and_runs(tiny):
    gr = pytest.importorskip("gradio")
    from vlmprune.demo.app import build_app
    from vlmprune.demo.engine import ModelStore

    store = ModelStore(loader=lambda spec: (_ for _ in ()).throw(DemoError(f"cannot load {spec}")))
    app = build_app(store=store, samples=[], vim=LazyVim(tiny))
    assert any(isinstance(b, gr.Tab) and "Vim" in str(b.label) for b in app.blocks.values())
    run = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "run_vim")
    final = list(run(_image(), ["top_vim", "tome", "divprune"], 4, 1, 2))[-1]
    assert "tiny: 4 blocks" in final[0] and "⚠" not in final[0], final[0]
    assert isinstance(final[1], Image.Image) and "colour: **" in final[2]
    top, tome, divprune = (final[3 + 4 * i : 7 + 4 * i] for i in range(3))
    assert [caption for _, caption in top[2]] == ["mixer:1 → 6", "mixer:2 → 4", "mixer:3 → 4"]
    assert len(tome[2]) == 4 and all(isinstance(im, Image.Image) for im, _ in tome[2])
    assert [caption for _, caption in divprune[2]] == ["mixer:1 → 4"] and "4 tokens at mixer:1" in divprune[3]
    final = list(run(_image(), ["fastv"], 4, 1, 2))[-1]
    assert "1 of 1 method(s) could not run" in final[0] and "method must be one of" in final[3 + 3]
    final = list(run(None, ["tome"], 4, 1, 2))[-1]
    assert "No image" in final[0]
