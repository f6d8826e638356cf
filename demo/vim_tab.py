"""The demo's vision-Mamba tab (Gradio): the embedded Vim classifier, pruned by ToP-ViM, ToMe and
the boundary methods.

Pick an image, one or more methods and their setting (patch tokens kept; the boundary layer of
DivPrune / uniform / random; ToMe's ``r``). Each column shows the tokens alive after every
pruning point (ToMe's merge groups coloured; dropped patches dimmed) and the predicted colour and
shape beside the unpruned model's. The model code is :mod:`vlmprune.demo.vim_view`; this module
is the layout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import gradio as gr

from .engine import DemoError, describe_error, load_image
from .view import draw_overlay
from .vim_view import VIM_METHODS, LazyVim, VimSetting, result_text
from .vit_tab import sample_gallery
from .vit_view import draw_point, point_caption

__all__ = ["vim_tab"]

log = logging.getLogger("vlmprune.demo")

DEFAULT_METHODS = ("top_vim", "tome", "divprune")
VIM_SLOTS = 4
DISPLAY_WIDTH = 256
POINT_WIDTH = 192
#: the embedded Vim's patch tokens and blocks, for the sliders before it is loaded
FALLBACK_TOKENS, FALLBACK_DEPTH = 64, 6


def _int(value, default):
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def vim_tab(vim: LazyVim, samples: list[dict], resolve_image: Callable, max_slots: int = VIM_SLOTS,
            default_methods=DEFAULT_METHODS) -> None:
    """Lay the Vim view out inside the current Gradio context and connect its events.
    ``resolve_image``: the app's check of an image payload (uploads and samples only)."""
    loaded = vim.loaded()
    n = loaded.n_tokens if loaded is not None else FALLBACK_TOKENS
    depth = loaded.depth if loaded is not None else FALLBACK_DEPTH
    first = next((s for s in samples if s["kind"] == "easyvqa"), samples[0] if samples else None)

    def blank(status: str):
        out = [status, None, ""]
        for _ in range(max_slots):
            out += [gr.update(visible=False), "", None, ""]
        return out

    def run_vim(image, methods, budget, layer, r):
        try:
            yield from _run(image, methods, budget, layer, r)
        except Exception as exc:
            log.exception("Vim run failed")
            yield blank(f"**⚠ error:** {describe_error(exc)}")

    def _run(image, methods, budget, layer, r):
        methods = [methods] if isinstance(methods, str) else [m for m in (methods or []) if m]
        if len(methods) > max_slots:
            yield blank(f"**⚠** choose at most {max_slots} methods at once (got {len(methods)}).")
            return
        yield blank("loading the Vim…" if vim.loaded() is None else "running…")
        try:
            model = vim.get()
        except Exception as exc:  # noqa: BLE001
            yield blank(f"**⚠ model:** {describe_error(exc)}")
            return
        setting = VimSetting(budget=_int(budget, 16), boundary_layer=_int(layer, None), r=_int(r, 6))
        try:
            picture = load_image(resolve_image(image))
            base = model.run(picture)
        except DemoError as exc:
            yield blank(f"**⚠ input:** {exc}")
            return
        out = blank("running…")
        out[1], out[2] = draw_overlay(base.image, base.final, DISPLAY_WIDTH, outline=False), result_text(base, model)
        errors = 0
        for i, name in enumerate(methods):
            j = 3 + 4 * i
            res = model.run(picture, name, setting)
            errors += not res.ok
            out[j : j + 4] = [gr.update(visible=True), f"**{name}**", None, result_text(res, model, base)]
            if res.ok:
                out[j + 2] = [(draw_point(res.image, view, POINT_WIDTH), point_caption(point, view)) for point, view in res.views]
            yield list(out)
        status = f"**model:** {model.summary()}"
        if errors:
            status += f"  \n**⚠** {errors} of {len(methods)} method(s) could not run; see their columns"
        elif not methods:
            status += "  \nchoose one or more methods to compare with the unpruned model"
        out[0] = status
        yield list(out)

    gr.Markdown(
        "### A vision Mamba, pruned: which tokens stay in the scan?\n"
        "The embedded Vim classifies easy-VQA images (colour and shape) with its class token in the middle of the "
        "scan. Per method: the patch tokens alive after each pruning point (ToP-ViM's three points, DivPrune / "
        "uniform / random at the boundary block, ToMe after every block with its merge groups coloured; dropped "
        "patches dimmed), then the prediction beside the unpruned model's."
    )
    with gr.Row():
        with gr.Column(scale=2):
            image = gr.Image(value=first["path"] if first else None, type="filepath", label="image",
                             sources=["upload", "clipboard"], height=240, elem_id="vim-image")
        with gr.Column(scale=3):
            methods = gr.Dropdown(choices=list(VIM_METHODS), value=[m for m in default_methods if m in VIM_METHODS][:max_slots],
                                  multiselect=True, max_choices=max_slots, label="methods", elem_id="vim-methods",
                                  info=f"up to {max_slots}")
            with gr.Row():
                budget = gr.Slider(1, n, value=min(16, n), step=1, elem_id="vim-budget",
                                   label=f"patch tokens kept (ToP-ViM, DivPrune, uniform, random; of {n})")
                layer = gr.Slider(1, depth, value=max(1, depth // 2), step=1, elem_id="vim-layer",
                                  label="boundary layer: pruned before this block (DivPrune, uniform, random)")
            r = gr.Slider(0, n // 2, value=6, step=1, label="ToMe r: tokens merged after each block", elem_id="vim-r")
            run_btn = gr.Button("Run", variant="primary", elem_id="vim-run")
    sample_gallery(samples, image, "vim")
    status = gr.Markdown(elem_id="vim-status")
    slots = []
    with gr.Row(equal_height=False):
        with gr.Column(min_width=220, elem_id="vim-slot-base"):
            gr.Markdown("**unpruned**")
            base_img = gr.Image(label="what the model sees", type="pil", format="png", interactive=False,
                                elem_id="vim-output-base")
            base_md = gr.Markdown(elem_id="vim-info-base")
        for i in range(max_slots):
            with gr.Column(visible=False, min_width=220, elem_id=f"vim-slot-{i}") as col:
                title = gr.Markdown(elem_id=f"vim-title-{i}")
                points = gr.Gallery(label="tokens after each point (click to enlarge)", columns=3, object_fit="contain",
                                    format="png", interactive=False, elem_id=f"vim-points-{i}")
                info = gr.Markdown(elem_id=f"vim-info-{i}")
            slots += [col, title, points, info]
    gr.on([run_btn.click], run_vim, [image, methods, budget, layer, r], [status, base_img, base_md] + slots,
          trigger_mode="always_last", concurrency_limit=2, preprocess=False)
