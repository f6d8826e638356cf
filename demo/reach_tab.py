"""The demo's VLA tab (Gradio): replay an ``easyvqa-reach`` episode of the embedded reach policy,
unpruned or pruned by a method, one picture per control step (frame, kept tokens, path, action).
The model and drawing code is :mod:`vlmprune.demo.reach_view`; this module is the layout."""

from __future__ import annotations

import gradio as gr

from vlmprune.embedded import reach

from .reach_view import (
    REACH_METHODS,
    LazyPolicy,
    draw_step,
    episode_text,
    replay,
    step_caption,
)

__all__ = ["reach_tab"]


def run_reach(lazy: LazyPolicy, episode, method, keep_percent):
    """``(markdown, [(image, caption), ...])`` for one replay; errors become the markdown."""
    try:
        policy, processor = lazy.get()
        spec = reach.episodes("test", int(episode) + 1, reach.DEFAULT_TEST["seed"])[int(episode)]
        rep = replay(policy, processor, spec, method, float(keep_percent) / 100)
    except (ValueError, RuntimeError, OSError) as exc:
        return f"⚠ {exc}", []
    return episode_text(rep), [(draw_step(rep, i), step_caption(rep, i)) for i in range(len(rep.steps))]


def reach_tab(lazy: LazyPolicy) -> None:
    gr.Markdown("Closed-loop **easyvqa-reach**: the embedded VLA policy walks to the named shape "
                "(≤ 10 steps, actions are binned (dx, dy) tokens). Each picture: the frame it saw, the "
                "visual tokens kept (dropped ones dimmed), the goal (cyan) and the action (white arrow).")
    with gr.Row():
        episode = gr.Slider(0, reach.DEFAULT_TEST["n"] - 1, value=0, step=1, label="test episode")
        method = gr.Dropdown(list(REACH_METHODS), value="vla_pruner (no temporal)", label="method")
        keep = gr.Slider(5, 100, value=25, step=2.5, label="visual tokens kept (%)")
        go = gr.Button("Replay", variant="primary")
    text = gr.Markdown()
    gallery = gr.Gallery(label="control steps", columns=5, height="auto")

    def run(episode_value, method_value, keep_value):
        return run_reach(lazy, episode_value, method_value, keep_value)

    run.__name__ = "run_reach"
    go.click(run, [episode, method, keep], [text, gallery])
