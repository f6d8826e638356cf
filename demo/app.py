"""The Gradio demo: which visual tokens does each pruning method keep, and what does the model
answer with them?

    vlmprune demo [--model embedded|ID|PATH] [--host 127.0.0.1] [--port 7860]
    python -m vlmprune.demo ...

Choose a sample image (or upload one), a question, one or more methods and a budget (visual
tokens kept per image, or the fraction kept). For every method, side by side with the unpruned
model: the image as the model sees it with the patch grid drawn over it (dropped patches dimmed,
kept ones outlined, merged ones tinted with the colour of the token they were merged into), the
scores the method ranked tokens by (as a heatmap, at its last scoring point), the answer, the
visual tokens kept and the time taken. Releasing the budget slider re-runs the methods. A second
tab shows a plain ViT classifier or segmenter pruned per layer (:mod:`vlmprune.demo.vit_tab`), a
third the embedded vision Mamba (Vim) pruned per point (:mod:`vlmprune.demo.vim_tab`), then a
VLA replay, a retrieval search and a text-to-image UNet sampled unpruned and merged
(:mod:`vlmprune.demo.diffusion_tab`).

Runs offline: the default model is the embedded easy-VQA LLaVA in ``assets/embedded_vlm``, the
samples are in ``assets/samples``; Gradio's analytics are off. The model field takes any
transformers LLaVA checkpoint (hub id or local path) for users with a hub and a GPU; anything
that goes wrong (a path that does not load, an image of the wrong kind, a budget above the
token count, a method the model cannot serve) is reported in the page, never as a traceback.

Requests are safe to overlap: ``wrap()`` patches the model in place, so each model has a lock
held from wrap to unwrap (see :mod:`vlmprune.demo.engine`).
"""

from __future__ import annotations

import argparse
import base64
import inspect
import io
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr

from .diffusion_tab import diffusion_tab
from .diffusion_view import LazyDiffusion
from .engine import (
    DEFAULT_MODEL,
    DemoError,
    DemoModel,
    ModelStore,
    RunResult,
    describe_error,
    method_choices,
    method_title,
    parse_budget,
)
from .reach_tab import reach_tab
from .reach_view import LazyPolicy
from .retrieval_tab import retrieval_tab
from .retrieval_view import LazyCollection
from .samples import samples as bundled_samples
from .samples import samples_dir
from .view import draw_heatmap, draw_overlay, legend_text, placeholder
from .vim_tab import vim_tab
from .vim_view import LazyVim
from .vit_tab import vit_tab
from .vit_view import LazyViT

__all__ = ["build_app", "main", "result_markdown"]

log = logging.getLogger("vlmprune.demo")

MAX_SLOTS = 6
DEFAULT_METHODS = ("visionzip", "fastv", "divprune")
DEFAULT_BUDGET = 32
DISPLAY_WIDTH = 448
#: tokens per image assumed before a model is loaded (the embedded model's 16x16 grid)
FALLBACK_TOKENS = 256


# ----------------------------------------------------------------------------------- text


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def result_markdown(result: RunResult, n_visual: int | None = None) -> str:
    """The text under a column: the answer, tokens kept, time, or the error."""
    if not result.ok:
        return f"**⚠ error:** {result.error}"
    answer = result.answer if result.answer else "(empty answer)"
    p = f" (p = {result.confidence:.2f})" if result.confidence is not None else ""
    lines = [f"**answer:** {answer}{p}"]
    view = result.view
    if result.method is None:
        total = view.owner.size if view is not None else n_visual
        lines.append(f"tokens: **{total}** visual tokens (all)")
        lines.append(f"time: {_ms(result.seconds)}")
        return "  \n".join(lines)
    total = view.owner.size
    tokens = result.tokens
    lines.append(f"tokens kept: **{tokens}** of {total} ({100 * tokens / total:.1f} %)")
    lines.append(legend_text(view))
    points = " → ".join(f"{p} {a}→{b}" for p, a, b in view.points)
    if points:
        lines.append(f"pruning points: {points}")
    stats = result.stats
    timing = f"time: {_ms(result.seconds)} (selection {_ms(result.select_seconds)})"
    if stats.get("llm_prefill_flops_unpruned"):
        ratio = stats["llm_prefill_flops"] / stats["llm_prefill_flops_unpruned"]
        kv = stats["kv_cache_bytes"] / max(1, stats["kv_cache_bytes_unpruned"])
        timing += f" · LLM prefill FLOPs {100 * ratio:.0f} % · KV cache {100 * kv:.0f} % of unpruned"
    lines.append(timing)
    if view.scores is not None:
        lines.append(f"heatmap: score rank at {view.score_point} (bright = high)")
    else:
        lines.append("heatmap: this method gives no scores")
    return "  \n".join(lines)


# ----------------------------------------------------------------------------------- the app


def image_input(payload, roots) -> object:
    """The image as it reaches the run handler (events run with ``preprocess=False``, so that an
    upload Pillow cannot read is reported by the demo, not by Gradio's generic error): None, a
    FileData dict, or a path; a PIL image or array from Python callers passes through. Paths
    must lie under one of ``roots`` (Gradio's upload folder, the samples), so a crafted request
    cannot make the server open other files."""
    if isinstance(payload, dict):
        path, url = payload.get("path"), payload.get("url")
        if not path and isinstance(url, str) and url.startswith("data:"):
            from PIL import Image

            try:
                return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
            except Exception as exc:  # noqa: BLE001
                raise DemoError(f"The pasted image could not be decoded: {describe_error(exc)}") from None
        payload = path
    if isinstance(payload, (str, Path)) and str(payload).strip():
        resolved = Path(payload).resolve()
        if not any(resolved.is_relative_to(r) for r in roots):
            raise DemoError("That image path is outside the demo's upload folder and samples; upload the image instead.")
        return str(resolved)
    return payload


def _supported(component, **kwargs) -> dict:
    """The keyword arguments ``component`` accepts (``buttons`` is Gradio 6; 5 ignores it)."""
    params = inspect.signature(component.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def build_app(store: ModelStore | None = None, default_model: str = DEFAULT_MODEL, samples: list[dict] | None = None,
              default_methods=DEFAULT_METHODS, default_budget: int = DEFAULT_BUDGET, max_slots: int = MAX_SLOTS,
              vit: LazyViT | None = None, vim: LazyVim | None = None, reach: LazyPolicy | None = None,
              retrieval: LazyCollection | None = None, diffusion: LazyDiffusion | None = None):
    """The Gradio Blocks app. ``store`` holds the models (a fresh :class:`ModelStore` loading
    with :func:`vlmprune.demo.engine.load_model` by default; tests add their own model); ``vit``
    the ViT tab's model (default: the embedded ViT-S/14, loaded on its first run); ``vim`` the Vim
    tab's (default: the embedded Vim, loaded on its first run); ``reach`` the VLA tab's policy
    (default: the embedded reach policy, loaded on its first replay); ``retrieval`` the retrieval
    tab's collection (default: the embedded retriever's, encoded on its first search); ``diffusion``
    the diffusion tab's text-to-image model (default: the embedded one, loaded on its first run)."""
    store = store or ModelStore()
    vit = vit or LazyViT()
    vim = vim or LazyVim()
    reach = reach or LazyPolicy()
    retrieval = retrieval or LazyCollection()
    diffusion = diffusion or LazyDiffusion()
    samples = bundled_samples() if samples is None else samples
    from gradio.utils import get_upload_folder

    sample_dirs = sorted({Path(x["path"]).resolve().parent for x in samples})
    if sample_dirs:
        gr.set_static_paths([str(d) for d in sample_dirs])
    roots = [Path(get_upload_folder()).resolve()] + sample_dirs
    choices = method_choices()
    default_methods = [m for m in (default_methods or ()) if m in choices][:max_slots]
    first = samples[0] if samples else None

    def n_tokens(spec) -> int:
        model = store.loaded(spec)
        return model.n_visual if model is not None else FALLBACK_TOKENS

    def budget_slider(unit, value, n):
        if str(unit).startswith("frac"):
            return gr.update(minimum=0.01, maximum=1.0, step=0.01, value=value,
                             label="budget: fraction of the visual tokens kept")
        return gr.update(minimum=1, maximum=n, step=1, value=value, label=f"budget: visual tokens kept per image (of {n})")

    # -- event handlers (never raise: errors go to the page) --------------------------------------
    def load(spec, unit, value):
        try:
            model = store.get(spec)
        except Exception as exc:  # noqa: BLE001
            return f"**⚠ model:** {describe_error(exc)}", gr.update()
        n = model.n_visual
        if not str(unit).startswith("frac"):
            try:
                value = min(max(1, round(float(value))), n)
            except (TypeError, ValueError):
                value = min(DEFAULT_BUDGET, n)
        return f"**model:** {model.summary()}", budget_slider(unit, value, n)

    def change_unit(spec, unit, value):
        """Switching the unit converts the current value (the other unit's) to the new one."""
        n = n_tokens(spec)
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = float(DEFAULT_BUDGET)
        if str(unit).startswith("frac"):
            v = round(min(1.0, max(0.01, v / n)), 2)
        else:
            v = int(min(n, max(1, round(v * n))))
        return budget_slider(unit, v, n)

    n_out = 3 + 5 * max_slots

    def blank(status: str):
        out = [status, None, ""]
        for _ in range(max_slots):
            out += [gr.update(visible=False), "", None, None, ""]
        assert len(out) == n_out
        return out

    def run(spec, image, question, methods, unit, value, max_new):
        try:
            yield from _run(spec, image, question, methods, unit, value, max_new)
        except Exception as exc:
            log.exception("demo run failed")
            yield blank(f"**⚠ error:** {describe_error(exc)}")

    def _run(spec, image, question, methods, unit, value, max_new):
        methods = [methods] if isinstance(methods, str) else [m for m in (methods or []) if m]
        try:
            max_new = int(min(256, max(1, float(max_new or 8))))
        except (TypeError, ValueError):
            max_new = 8
        if len(methods) > max_slots:
            yield blank(f"**⚠** choose at most {max_slots} methods at once (got {len(methods)}).")
            return
        yield blank("loading the model…" if store.loaded(spec) is None else "running…")
        try:
            model: DemoModel = store.get(spec)
        except Exception as exc:  # noqa: BLE001
            yield blank(f"**⚠ model:** {describe_error(exc)}")
            return
        try:
            prepared = model.prepare(image_input(image, roots), question)
        except DemoError as exc:
            yield blank(f"**⚠ input:** {exc}")
            return
        budget, budget_error = None, None
        try:
            budget = parse_budget(unit, value, model.n_visual)
        except DemoError as exc:
            budget_error = str(exc)
        out = blank("running…")
        base = model.run(None, question, None, max_new_tokens=max_new, prepared=prepared)
        out[1] = draw_overlay(base.image, base.view, DISPLAY_WIDTH, outline=False) if base.ok else base.image
        out[2] = result_markdown(base, model.n_visual)
        for i, name in enumerate(methods):
            j = 3 + 5 * i
            out[j : j + 5] = [gr.update(visible=True), method_title(name), None, None, "running…"]
        yield list(out)
        errors = 0
        for i, name in enumerate(methods):
            j = 3 + 5 * i
            if budget_error:
                res = RunResult(name, None, image=base.image, error=budget_error)
            else:
                res = model.run(None, question, name, budget, max_new_tokens=max_new, prepared=prepared)
            errors += not res.ok
            if res.ok:
                out[j + 2] = draw_overlay(res.image, res.view, DISPLAY_WIDTH)
                out[j + 3] = draw_heatmap(res.image, res.view, DISPLAY_WIDTH) or placeholder(
                    res.image, "this method gives no scores", DISPLAY_WIDTH)
            out[j + 4] = result_markdown(res, model.n_visual)
            yield list(out)
        shown = f"{budget} tokens" if isinstance(budget, int) else (f"{budget:g} of the tokens" if budget else "—")
        status = f"**model:** {model.summary()} · budget {shown}"
        if budget_error:
            status += f"  \n**⚠ budget:** {budget_error}"
        elif not methods:
            status += "  \nchoose one or more methods to compare with the unpruned answer"
        elif errors:
            status += f"  \n**⚠** {errors} of {len(methods)} method(s) could not run; see their columns"
        out[0] = status
        yield list(out)

    # -- layout ------------------------------------------------------------------------------------
    with gr.Blocks(title="vlmprune demo", analytics_enabled=False) as demo:
        with gr.Tab("VLM: answers", elem_id="tab-vlm"):
            gr.Markdown(
                "## vlmprune: which visual tokens does each method keep?\n"
                "Pick an image and a question, one or more training-free pruning methods and a budget. "
                "Each column shows the image as the model sees it with its patch grid (dropped patches dimmed, "
                "kept ones outlined, merged ones tinted with the colour of the token they went into), the scores the "
                "method ranked tokens by, and the answer with only those tokens; the first column is the unpruned model."
            )
            with gr.Row():
                model_box = gr.Textbox(value=default_model, label="model", scale=5, elem_id="model",
                                       info="'embedded' (the bundled easy-VQA LLaVA, offline) or a transformers LLaVA "
                                            "checkpoint: hub id or local directory")
                load_btn = gr.Button("load model", scale=1, elem_id="load")
            with gr.Row():
                with gr.Column(scale=2):
                    image = gr.Image(value=first["path"] if first else None, type="filepath", label="image",
                                     sources=["upload", "clipboard"], height=260, elem_id="image")
                with gr.Column(scale=3):
                    question = gr.Textbox(value=first["question"] if first else "", label="question", elem_id="question")
                    methods = gr.Dropdown(choices=choices, value=default_methods, multiselect=True, label="methods",
                                          max_choices=max_slots, elem_id="methods",
                                          info=f"up to {max_slots}, shown side by side")
                    with gr.Row():
                        unit = gr.Radio(["tokens", "fraction"], value="tokens", label="budget as", elem_id="unit", scale=1)
                        budget = gr.Slider(1, FALLBACK_TOKENS, value=default_budget, step=1, elem_id="budget", scale=3,
                                           label=f"budget: visual tokens kept per image (of {FALLBACK_TOKENS})")
                    with gr.Accordion("generation", open=False):
                        max_new = gr.Slider(1, 64, value=8, step=1, label="max new tokens")
                    run_btn = gr.Button("Run", variant="primary", elem_id="run")
            gallery = None
            if samples:
                gallery = gr.Gallery(
                    value=[(s["path"], s["kind"]) for s in samples], label="samples (click one): easy-VQA test images, "
                    "easyvqa-grid mosaics, scikit-image photos", columns=len(samples), height=150, allow_preview=False,
                    object_fit="contain", elem_id="samples", interactive=False, **_supported(gr.Gallery, buttons=[]),
                )
            status = gr.Markdown(elem_id="status")
            slots = []
            out_kw = _supported(gr.Image, buttons=["download", "fullscreen"])
            with gr.Row(equal_height=False):
                with gr.Column(min_width=240, elem_id="slot-base"):
                    gr.Markdown("**all tokens (unpruned)**")
                    base_img = gr.Image(label="all patches", type="pil", format="png", interactive=False, elem_id="overlay-base", **out_kw)
                    base_md = gr.Markdown(elem_id="info-base")
                for i in range(max_slots):
                    with gr.Column(visible=False, min_width=240, elem_id=f"slot-{i}") as col:
                        title = gr.Markdown(elem_id=f"title-{i}")
                        over = gr.Image(label="kept tokens", type="pil", format="png", interactive=False, elem_id=f"overlay-{i}", **out_kw)
                        heat = gr.Image(label="scores", type="pil", format="png", interactive=False, elem_id=f"heatmap-{i}", **out_kw)
                        info = gr.Markdown(elem_id=f"info-{i}")
                    slots += [col, title, over, heat, info]

            outputs = [status, base_img, base_md] + slots
            inputs = [model_box, image, question, methods, unit, budget, max_new]
            # one listener for every way of starting a run: within a page, runs never overlap (a new
            # trigger during a run starts one more run afterwards, with the latest values), so the
            # columns never mix two runs' outputs; runs of different pages share the model's lock.
            # preprocess=False: the image arrives raw (see image_input()).
            gr.on([run_btn.click, question.submit, budget.release], run, inputs, outputs,
                  trigger_mode="always_last", concurrency_limit=4, preprocess=False)
            unit.change(change_unit, [model_box, unit, budget], budget, queue=False)
            load_btn.click(load, [model_box, unit, budget], [status, budget])
            model_box.submit(load, [model_box, unit, budget], [status, budget])
            demo.load(load, [model_box, unit, budget], [status, budget])
            if gallery is not None:

                def pick(evt: gr.SelectData):
                    chosen = samples[evt.index]
                    return chosen["path"], chosen["question"]

                gallery.select(pick, None, [image, question], queue=False)
        with gr.Tab("ViT: classification / segmentation", elem_id="tab-vit"):
            vit_tab(vit, samples, lambda payload: image_input(payload, roots))
        with gr.Tab("Vim: vision Mamba", elem_id="tab-vim"):
            vim_tab(vim, samples, lambda payload: image_input(payload, roots))
        with gr.Tab("VLA: reach", elem_id="tab-vla"):
            reach_tab(reach)
        with gr.Tab("Retrieval: ColPali", elem_id="tab-retrieval"):
            retrieval_tab(retrieval)
        with gr.Tab("Diffusion: UNet", elem_id="tab-diffusion"):
            diffusion_tab(diffusion)
    demo.vlmprune_store = store
    demo.vlmprune_vit = vit
    demo.vlmprune_vim = vim
    demo.vlmprune_reach = reach
    demo.vlmprune_retrieval = retrieval
    demo.vlmprune_diffusion = diffusion
    return demo


# ----------------------------------------------------------------------------------- command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="vlmprune demo", description="The Gradio demo (offline by default).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="'embedded' (default) or a transformers LLaVA checkpoint (hub id or local path)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-preload", action="store_true", help="load the model on the first request")
    return parser.parse_args(argv)


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    """``vlmprune demo``: serve the demo on ``--host``:``--port`` until interrupted."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from functools import partial

    from .engine import load_model

    store = ModelStore(loader=partial(load_model, device=args.device))
    if not args.no_preload:
        try:
            model = store.get(args.model)
            print(f"model: {model.summary()}", flush=True)
        except DemoError as exc:  # the page shows it too; the server still starts
            print(f"warning: {exc}", file=sys.stderr, flush=True)
    app = build_app(store=store, default_model=args.model)
    port = args.port or free_port(args.host)
    app.queue().launch(server_name=args.host, server_port=port, show_error=True, ssr_mode=False,
                       allowed_paths=[str(samples_dir())], footer_links=[])


if __name__ == "__main__":
    main()
