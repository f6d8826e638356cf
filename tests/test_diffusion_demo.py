"""The demo's diffusion view (demo/diffusion_view.py, demo/diffusion_tab.py) without a browser: at
ratio 0 the pruned image is the unpruned one bit for bit, the drawn tokens are the recorded keep,
LatentMapper's forwards are not among the sampling's records, errors come back as messages, and
the app's diffusion tab runs end to end. The model is a tiny random text-to-image UNet (16 px, an
8 x 8 latent: 64 tokens in the highest-resolution blocks). CPU, one thread, no network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from vlmprune.demo.diffusion_view import (
    DiffusionDemoModel,
    DiffusionSetting,
    LazyDiffusion,
    diffusion_wrap_options,
    draw_tokens,
    enlarge,
    highest_resolution_point,
    result_text,
    step_views,
)
from vlmprune.demo.engine import DemoError

from vlmprune.embedded import diffusion

pytest.importorskip("diffusers")

CONFIG = {"block_out_channels": [8, 16, 16], "norm_num_groups": 4, "context_dim": 8, "image_size": 16, "steps": 2}
STEPS = 3
#: the transformer blocks of the highest resolution (downsample 1), in running order
TOP_BLOCKS = ["unet.down.0:0", "unet.up.2:0", "unet.up.2:1"]


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        yield DiffusionDemoModel(diffusion.TextToImage(diffusion.DiffusionConfig(**CONFIG)), name="tiny")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tiny):
    return tiny.run("a red circle", seed=4, steps=STEPS)


def _cells_as_drawn(image: Image.Image, drawn: Image.Image, side: int) -> np.ndarray:
    """Per token cell (raster order): whether its inside (grid lines left out) is the enlarged
    image unchanged."""
    width = drawn.width
    plain, out = np.asarray(enlarge(image, width), int), np.asarray(drawn, int)
    cell = width // side
    same = (plain == out).all(-1).reshape(side, cell, side, cell)[:, 2:-2, :, 2:-2]
    return same.all((1, 3)).reshape(-1)


@pytest.mark.parametrize("method", ["tomesd", "optiprune"])
def test_ratio_zero_is_the_unpruned_image_and_the_drawing_is_the_recorded_keep(tiny, base, method):
    whole = tiny.run("a red circle", 4, STEPS, method, DiffusionSetting(ratio=0.0))
    assert whole.ok and whole.image.tobytes() == base.image.tobytes()
    res = tiny.run("a red circle", 4, STEPS, method, DiffusionSetting(ratio=0.5))
    assert res.ok, res.error
    assert res.image.tobytes() != base.image.tobytes()
    assert [p["point"] for p in res.stats["points"]] == TOP_BLOCKS
    assert all(p["in"] == [64, 64] and p["out"] == [32, 32] for p in res.stats["points"])
    assert len(res.records) == STEPS * len(TOP_BLOCKS) and highest_resolution_point(res.records) == TOP_BLOCKS[0]
    views = step_views(res.records, TOP_BLOCKS[0])
    assert len(views) == STEPS
    for rec, view in zip(res.records[:: len(TOP_BLOCKS)], views):
        kept = rec.token_index[0][rec.selection.keep[0]].numpy()
        assert sorted(np.flatnonzero(view.kept)) == sorted(kept) and view.merged.sum() == 64 - kept.size
    last = views[-1]
    drawn = draw_tokens(res.image, last, 256)
    untouched = _cells_as_drawn(res.image, drawn, 8)
    assert untouched.sum() == res.stats["points"][0]["out"][0] == 32
    assert np.array_equal(untouched, last.kept)  # the merged (OptiPrune: pruned) cells are the dimmed ones


def test_latentmapper_runs_before_the_recorded_sampling(tiny, base):
    plain = tiny.run("a red circle", 4, STEPS, "optiprune")
    mapped = tiny.run("a red circle", 4, STEPS, "optiprune", DiffusionSetting(latentmapper=True))
    assert mapped.ok and mapped.latentmapper and len(mapped.records) == STEPS * len(TOP_BLOCKS)
    assert mapped.image.tobytes() != plain.image.tobytes()
    assert "LatentMapper first" in result_text(mapped, tiny, base)


def test_wrap_options_and_errors_name_the_parameter(tiny):
    assert diffusion_wrap_options("optiprune", DiffusionSetting(ratio=0.3, sx=1, merge_mlp=True)) == {
        "ratio": 0.3, "max_downsample": 1, "sx": 1, "sy": 2, "use_rand": True, "merge_attn": True,
        "merge_crossattn": False, "merge_mlp": True}
    with pytest.raises(DemoError, match="method must be one of tomesd, optiprune in the diffusion view; got 'fastv'"):
        diffusion_wrap_options("fastv", DiffusionSetting())
    assert tiny.run("a red circle", 0, 1, "fastv").error.startswith("method must be one of tomesd, optiprune")
    assert "option 'ratio' of method 'tomesd' must be a number in [0, 1)" in tiny.run(
        "a red circle", 0, 1, "tomesd", DiffusionSetting(ratio=1.0)).error
    assert "at least one of merge_attn" in tiny.run("a red circle", 0, 1, "tomesd", DiffusionSetting(merge_attn=False)).error
    with pytest.raises(DemoError, match="expected 'a <colour> <shape>' with colour in"):
        tiny.run("a purple circle")
    with pytest.raises(DemoError, match="steps must be from 1 to 100, got 0"):
        tiny.run("a red circle", steps=0)
    assert tiny.run("  A  Red CIRCLE ").prompt == "a red circle"


def test_result_text_reports_blocks_flops_time_and_difference(tiny, base):
    res = tiny.run("a red circle", 4, STEPS, "tomesd", DiffusionSetting(ratio=0.5, use_rand=False))
    text = result_text(res, tiny, base)
    assert "**tomesd** ratio 0.5 in blocks ≤ 1× smaller than the latent, 2x2 windows, reduced: self-attention" in text
    assert "unet.down.0:0 64→32 · unet.down.1:0 16 · unet.mid:0 4 · unet.up.1:0 16" in text
    assert "unet.down.0:0, last step: 32 kept, 32 merged, 0 dropped of 64 patches" in text
    flops = res.stats["transformer_flops"] / res.stats["transformer_flops_unpruned"]
    assert 0 < flops < 1 and f"FLOPs per step: {100 * flops:.0f} % of unpruned" in text
    assert "(unpruned " in text and "mean |Δ|" in text
    whole = tiny.run("a red circle", 4, STEPS, "optiprune", DiffusionSetting(ratio=0.0))
    assert "image vs unpruned: identical" in result_text(whole, tiny, base)
    assert result_text(base, tiny).startswith("**unpruned** · all tokens")
    assert "tiny: 16 px images from a 8x8 latent; tokens per transformer block: unet.down.0:0 64" in tiny.summary()


def test_app_diffusion_tab_builds_and_runs(tiny, base):
    gr = pytest.importorskip("gradio")
    from vlmprune.demo.app import build_app
    from vlmprune.demo.engine import ModelStore

    store = ModelStore(loader=lambda spec: (_ for _ in ()).throw(DemoError(f"cannot load {spec}")))
    app = build_app(store=store, samples=[], diffusion=LazyDiffusion(tiny))
    assert any(isinstance(b, gr.Tab) and str(b.label) == "Diffusion: UNet" for b in app.blocks.values())
    run = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "run_diffusion")
    text, unpruned, pruned, steps = run("a red circle", 4, STEPS, "tomesd", 0.5, 1, 2, 2, True, ["self-attention"],
                                        False, None)
    assert text.startswith("*a red circle*, seed 4") and "⚠" not in text and "64→32" in text
    assert unpruned.size == pruned.size == (256, 256)
    assert np.array_equal(np.asarray(unpruned), np.asarray(enlarge(base.image, 256)))
    assert [caption for _, caption in steps] == [f"unet.down.0:0 step {i}: 32 of 64 kept" for i in (1, 2, 3)]
    assert all(isinstance(im, Image.Image) and im.size == (160, 160) for im, _ in steps)
    text, _, pruned, steps = run("a red circle", 4, STEPS, "fastv", 0.5, 1, 2, 2, True, ["self-attention"], False, None)
    assert "**⚠ error:** method must be one of tomesd, optiprune" in text and pruned is None and steps == []
    assert run("a purple circle", 4, STEPS, "tomesd", 0.5)[0].startswith("**⚠ error:** caption 'a purple circle'")
    failing = LazyDiffusion(lambda: (_ for _ in ()).throw(DemoError("no weights here")))
    app = build_app(store=store, samples=[], diffusion=failing)
    run = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "run_diffusion")
    assert run("a red circle", 0, 1, "tomesd", 0.5) == ("**⚠ error:** no weights here", None, None, [])
