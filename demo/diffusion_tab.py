"""The demo's diffusion tab (Gradio): the embedded text-to-image model sampled from a prompt and a
seed, unpruned and with its UNet's transformer blocks reduced by ToMeSD or OptiPrune's SimPrune;
the two images side by side and, for the pruned run, the latent tokens kept / merged at the
highest-resolution block in each denoising step. The model and drawing code is
:mod:`vlmprune.demo.diffusion_view`; this module is the layout."""

from __future__ import annotations

import logging

import gradio as gr

from vlmprune.embedded.diffusion import DiffusionConfig

from .diffusion_view import (
    DEFAULT_STEPS,
    DIFFUSION_METHODS,
    MAX_STEPS,
    PROMPTS,
    DiffusionSetting,
    LazyDiffusion,
    draw_groups,
    draw_tokens,
    enlarge,
    highest_resolution_point,
    result_text,
    step_caption,
    step_views,
)
from .engine import DemoError, describe_error

__all__ = ["diffusion_tab", "run_diffusion"]

log = logging.getLogger("vlmprune.demo")

DISPLAY_WIDTH = 256
STEP_WIDTH = 160
#: the branches a method may run on the reduced tokens: label -> DiffusionSetting field
BRANCHES = {"self-attention": "merge_attn", "cross-attention": "merge_crossattn", "MLP": "merge_mlp"}


def run_diffusion(lazy: LazyDiffusion, prompt, seed, steps, method, ratio, max_downsample=1, sx=2, sy=2,
                  use_rand=True, branches=("self-attention",), latentmapper=False, guidance=None):
    """``(markdown, unpruned image, pruned image, [(token picture, caption), ...])`` for one prompt;
    errors become the markdown."""
    try:
        model = lazy.get()
        setting = DiffusionSetting(float(ratio), int(max_downsample), int(sx), int(sy), bool(use_rand),
                                   **{field: label in (branches or ()) for label, field in BRANCHES.items()},
                                   latentmapper=bool(latentmapper))
        guidance = None if guidance is None else float(guidance)
        base = model.run(prompt, seed, steps, guidance=guidance)
        pruned = model.run(prompt, seed, steps, method, setting, guidance)
    except Exception as exc:
        if not isinstance(exc, DemoError):
            log.exception("diffusion run failed")
        return f"**⚠ error:** {describe_error(exc)}", None, None, []
    text = f"*{base.prompt or '(empty caption)'}*, seed {int(seed)}  \n{result_text(base, model)}  \n" + result_text(pruned, model, base)
    if not pruned.ok:
        return text, enlarge(base.image, DISPLAY_WIDTH), None, []
    point = highest_resolution_point(pruned.records)
    views = step_views(pruned.records, point)
    steps_drawn = [(draw_groups(pruned.image, view, STEP_WIDTH), f"{point} {step_caption(i, view)}") for i, view in enumerate(views)]
    return text, enlarge(base.image, DISPLAY_WIDTH), draw_tokens(pruned.image, views[-1], DISPLAY_WIDTH), steps_drawn


def diffusion_tab(lazy: LazyDiffusion) -> None:
    """Lay the diffusion view out inside the current Gradio context and connect its events."""
    gr.Markdown(
        "### A text-to-image UNet, merged: which latent tokens do its transformer blocks still see?\n"
        "The embedded pixel-space diffusion model draws easy-VQA captions ('a <colour> <shape>', 32 px) with DDIM "
        "and classifier-free guidance. The same prompt and seed are sampled unpruned and with ToMeSD (tokens merged "
        "into their most similar window destination) or OptiPrune's SimPrune (tokens pruned, given a copy of their "
        "most similar kept token's output). Beside the pruned image: its latent tokens at the highest-resolution "
        "transformer block at the last step (merged or pruned ones dimmed) and in each step (each merge group in its "
        "own colour: the tokens that share one output)."
    )
    defaults = DiffusionSetting()
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Dropdown(list(PROMPTS), value=PROMPTS[0], allow_custom_value=True, label="prompt",
                                 elem_id="diffusion-prompt", info="'a <colour> <shape>' (the model's captions)")
            with gr.Row():
                seed = gr.Number(0, precision=0, label="seed", elem_id="diffusion-seed")
                steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="DDIM steps", elem_id="diffusion-steps")
        with gr.Column(scale=3):
            method = gr.Radio(list(DIFFUSION_METHODS), value=DIFFUSION_METHODS[0], label="method", elem_id="diffusion-method")
            ratio = gr.Slider(0, 0.95, value=defaults.ratio, step=0.05, elem_id="diffusion-ratio",
                              label="ratio: fraction of each block's tokens removed")
            with gr.Accordion("more options", open=False):
                max_downsample = gr.Radio([1, 2, 4, 8], value=defaults.max_downsample, label="max_downsample: act in "
                                          "blocks at most this many times smaller than the latent")
                with gr.Row():
                    sx = gr.Slider(1, 4, value=defaults.sx, step=1, label="sx: window width")
                    sy = gr.Slider(1, 4, value=defaults.sy, step=1, label="sy: window height")
                use_rand = gr.Checkbox(defaults.use_rand, label="use_rand: a random destination in each window")
                branches = gr.CheckboxGroup(list(BRANCHES), value=["self-attention"],
                                            label="branches run on the reduced tokens (merge_attn, merge_crossattn, merge_mlp)")
                latentmapper = gr.Checkbox(defaults.latentmapper, label="LatentMapper first: optimise the initial noise "
                                           "on the wrapped UNet (OptiPrune)")
                guidance = gr.Slider(1, 8, value=DiffusionConfig().guidance, step=0.5, label="guidance scale")
            go = gr.Button("Generate", variant="primary", elem_id="diffusion-run")
    text = gr.Markdown(elem_id="diffusion-info")
    with gr.Row(equal_height=False):
        base_img = gr.Image(label="unpruned", type="pil", format="png", interactive=False, elem_id="diffusion-base")
        pruned_img = gr.Image(label="pruned: tokens kept at the last step (merged dimmed)", type="pil", format="png",
                              interactive=False, elem_id="diffusion-pruned")
        tokens = gr.Gallery(label="merge groups at the highest-resolution block, per step", columns=5, format="png",
                            interactive=False, elem_id="diffusion-steps-tokens")

    def run(*values):
        return run_diffusion(lazy, *values)

    run.__name__ = "run_diffusion"
    inputs = [prompt, seed, steps, method, ratio, max_downsample, sx, sy, use_rand, branches, latentmapper, guidance]
    go.click(run, inputs, [text, base_img, pruned_img, tokens], concurrency_limit=2)
