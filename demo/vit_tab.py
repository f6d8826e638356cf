"""The demo's ViT tab (Gradio): a plain ViT classifier or segmenter, pruned by ViT methods.

Pick an image (a sample or an upload), a task (classification: easy-VQA colour and shape;
segmentation: background / circle / rectangle / triangle per pixel), one or more methods and
their setting (patch tokens kept and boundary layer for the boundary methods, ``r`` for ToMe, the
threshold p0 for DToP). Each column shows the tokens alive after every pruning point (ToMe's
merge groups coloured, each original patch in its final group's colour; dropped or exited patches
dimmed), the prediction or segmentation map beside the unpruned model's, the tokens kept and the
time. The model and drawing code is :mod:`vlmprune.demo.vit_view`; this module is the layout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import gradio as gr

from .engine import DemoError, describe_error, load_image
from .view import draw_overlay
from .vit_view import (
    BOUNDARY_METHODS,
    TASKS,
    VIT_METHODS,
    LazyViT,
    Setting,
    ViTDemoModel,
    draw_point,
    draw_segmentation,
    point_caption,
    result_text,
    seg_classes,
)

__all__ = ["vit_tab"]

log = logging.getLogger("vlmprune.demo")

DEFAULT_METHODS = ("tome", "divprune", "dtop")
VIT_SLOTS = 4
DISPLAY_WIDTH = 336
POINT_WIDTH = 224
#: the embedded ViT-S/14's patch tokens and blocks, for the sliders before it is loaded
FALLBACK_TOKENS, FALLBACK_DEPTH = 256, 12


def sample_gallery(samples: list[dict], image, prefix: str) -> None:
    """A row of the bundled samples (if any); clicking one loads it into ``image``."""
    if not samples:
        return
    gallery = gr.Gallery(value=[(s["path"], s["kind"]) for s in samples], label="samples (click one)",
                         columns=len(samples), height=130, allow_preview=False, object_fit="contain",
                         elem_id=f"{prefix}-samples", interactive=False)

    def pick(evt: gr.SelectData):
        return samples[evt.index]["path"]

    gallery.select(pick, None, image, queue=False)

def _number(value, default, kind=float):
    try:
        return kind(float(value))
    except (TypeError, ValueError):
        return default


def output_image(result, model: ViTDemoModel, width: int = DISPLAY_WIDTH):
    """The segmentation map, or (classification) the tokens the head reads."""
    if result.task == "segmentation":
        return draw_segmentation(result.image, seg_classes(result.output), width)
    if result.method is None:
        return draw_overlay(result.image, result.final, width, outline=False)
    return draw_point(result.image, result.final, width)


def vit_tab(vit: LazyViT, samples: list[dict], resolve_image: Callable, max_slots: int = VIT_SLOTS,
            default_methods=DEFAULT_METHODS) -> None:
    """Lay the ViT view out inside the current Gradio context and connect its events.
    ``resolve_image``: the app's check of an image payload (uploads and samples only)."""
    loaded = vit.loaded()
    n = loaded.n_tokens if loaded is not None else FALLBACK_TOKENS
    depth = loaded.depth if loaded is not None else FALLBACK_DEPTH
    first = next((s for s in samples if s["kind"] == "easyvqa"), samples[0] if samples else None)
    n_out = 3 + 5 * max_slots

    def blank(status: str):
        out = [status, None, ""]
        for _ in range(max_slots):
            out += [gr.update(visible=False), "", None, None, ""]
        return out

    def run_vit(image, task, methods, budget, layer, r, threshold):
        try:
            yield from _run(image, task, methods, budget, layer, r, threshold)
        except Exception as exc:
            log.exception("ViT run failed")
            yield blank(f"**⚠ error:** {describe_error(exc)}")

    def _run(image, task, methods, budget, layer, r, threshold):
        methods = [methods] if isinstance(methods, str) else [m for m in (methods or []) if m]
        if len(methods) > max_slots:
            yield blank(f"**⚠** choose at most {max_slots} methods at once (got {len(methods)}).")
            return
        if task not in TASKS:
            yield blank(f"**⚠** task must be one of {', '.join(TASKS)}; got {task!r}.")
            return
        yield blank("loading the ViT…" if vit.loaded() is None else "running…")
        try:
            model = vit.get()
        except Exception as exc:  # noqa: BLE001
            yield blank(f"**⚠ model:** {describe_error(exc)}")
            return
        setting = Setting(budget=_number(budget, 64, int), boundary_layer=_number(layer, None, int),
                          r=_number(r, 8, int), threshold=_number(threshold, 0.9))
        try:
            picture = load_image(resolve_image(image))
            base = model.run(picture, task)
        except DemoError as exc:
            yield blank(f"**⚠ input:** {exc}")
            return
        out = blank("running…")
        out[1], out[2] = output_image(base, model), result_text(base, model)
        for i, name in enumerate(methods):
            j = 3 + 5 * i
            out[j : j + 5] = [gr.update(visible=True), f"**{name}**", None, None, "running…"]
        yield list(out)
        errors = 0
        for i, name in enumerate(methods):
            j = 3 + 5 * i
            res = model.run(picture, task, name, setting)
            errors += not res.ok
            if res.ok:
                out[j + 2] = [(draw_point(res.image, view, POINT_WIDTH), point_caption(point, view)) for point, view in res.views]
                out[j + 3] = output_image(res, model)
            out[j + 4] = result_text(res, model, base)
            yield list(out)
        status = f"**model:** {model.summary()} · task {task}"
        if errors:
            status += f"  \n**⚠** {errors} of {len(methods)} method(s) could not run; see their columns"
        elif not methods:
            status += "  \nchoose one or more methods to compare with the unpruned model"
        out[0] = status
        assert len(out) == n_out
        yield list(out)

    gr.Markdown(
        "### A plain ViT, pruned: which tokens survive each layer?\n"
        "The embedded ViT-S/14 classifies easy-VQA images (colour and shape) or segments them (background / "
        "circle / rectangle / triangle). Per method: the tokens alive after each pruning point (ToMe's merge "
        "groups coloured, each patch in its final group's colour; dropped or exited patches dimmed), then the "
        "prediction or segmentation map beside the unpruned model's."
    )
    with gr.Row():
        with gr.Column(scale=2):
            image = gr.Image(value=first["path"] if first else None, type="filepath", label="image",
                             sources=["upload", "clipboard"], height=240, elem_id="vit-image")
        with gr.Column(scale=3):
            task = gr.Radio(list(TASKS), value="segmentation", label="task", elem_id="vit-task")
            methods = gr.Dropdown(choices=list(VIT_METHODS), value=[m for m in default_methods if m in VIT_METHODS][:max_slots],
                                  multiselect=True, max_choices=max_slots, label="methods", elem_id="vit-methods",
                                  info=f"up to {max_slots}; DToP needs the segmentation task (a dense head)")
            with gr.Row():
                budget = gr.Slider(1, n, value=min(64, n), step=1, elem_id="vit-budget",
                                   label=f"patch tokens kept ({', '.join(BOUNDARY_METHODS[:3])}, …; of {n})")
                layer = gr.Slider(1, depth, value=max(1, depth // 2), step=1, elem_id="vit-layer",
                                  label="boundary layer: pruned before this block")
            with gr.Row():
                r = gr.Slider(0, 32, value=8, step=1, label="ToMe r: tokens merged per block", elem_id="vit-r")
                threshold = gr.Slider(0.5, 1.0, value=0.9, step=0.01, label="DToP p0: exit threshold",
                                      elem_id="vit-threshold")
            run_btn = gr.Button("Run", variant="primary", elem_id="vit-run")
    sample_gallery(samples, image, "vit")
    status = gr.Markdown(elem_id="vit-status")
    slots = []
    with gr.Row(equal_height=False):
        with gr.Column(min_width=240, elem_id="vit-slot-base"):
            gr.Markdown("**unpruned**")
            base_img = gr.Image(label="output", type="pil", format="png", interactive=False, elem_id="vit-output-base")
            base_md = gr.Markdown(elem_id="vit-info-base")
        for i in range(max_slots):
            with gr.Column(visible=False, min_width=240, elem_id=f"vit-slot-{i}") as col:
                title = gr.Markdown(elem_id=f"vit-title-{i}")
                points = gr.Gallery(label="tokens after each point (click to enlarge)", columns=3, object_fit="contain",
                                    format="png", interactive=False, elem_id=f"vit-points-{i}")
                output = gr.Image(label="output", type="pil", format="png", interactive=False, elem_id=f"vit-output-{i}")
                info = gr.Markdown(elem_id=f"vit-info-{i}")
            slots += [col, title, points, output, info]
    gr.on([run_btn.click], run_vit, [image, task, methods, budget, layer, r, threshold], [status, base_img, base_md] + slots,
          trigger_mode="always_last", concurrency_limit=2, preprocess=False)
