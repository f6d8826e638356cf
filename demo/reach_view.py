"""The demo's VLA view without Gradio: replay one ``easyvqa-reach`` episode of the embedded reach
policy (:mod:`vlmprune.embedded.reach`, ``assets/embedded_vla``), unpruned or wrapped by a method,
and draw each control step: the frame the policy saw, the visual tokens the method kept (dropped
patches dimmed, kept ones outlined), the agent's path so far, the goal, and the action taken.

Pure functions of a :class:`~vlmprune.vla.VLAPolicy` and its processor, testable without Gradio;
the tab's layout is :func:`vlmprune.demo.reach_tab.reach_tab`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

import vlmprune
from vlmprune.embedded import reach

from .engine import LazyModel
from .view import TokenView, draw_overlay, full_view, token_view

#: the methods the tab offers (the benchmark's rows)
REACH_METHODS = ("none", "vla_pruner", "vla_pruner (no temporal)", "fastv", "divprune", "uniform", "random")
GOAL_COLOUR = (0, 200, 255)
PATH_COLOUR = (255, 0, 255)


@dataclass
class StepView:
    """One control step: ``frame`` (what the policy saw), the agent's ``cell`` before acting, the
    ``action`` it took, and ``view`` (the tokens the method kept at its last pruning point)."""

    step: int
    frame: Image.Image
    cell: tuple[int, int]
    action: tuple[int, int]
    view: TokenView


@dataclass
class Replay:
    spec: reach.EpisodeSpec
    method: str
    budget: float | None
    steps: list[StepView]
    success: bool
    final_cell: tuple[int, int]


def _method(name: str) -> tuple[str, dict]:
    if name not in REACH_METHODS:
        raise ValueError(f"method must be one of {list(REACH_METHODS)}, got {name!r}")
    if name == "vla_pruner (no temporal)":
        return "vla_pruner", {"use_temporal": False}
    return name, {}


def replay(policy, processor, spec: reach.EpisodeSpec, method: str = "none", budget: float | None = None) -> Replay:
    """Run ``spec`` in closed loop with ``policy`` (wrapped by ``method`` at ``budget``, a fraction
    of the visual tokens kept, for the length of the episode) and record every step."""
    from vlmprune.tools.eval_reach import actor

    name, options = _method(method)
    handle = None if name == "none" else vlmprune.wrap(policy, name, budget=budget, **options)
    act = actor(policy, processor)
    grid = _grid(policy)
    steps: list[StepView] = []
    cells = [spec.start]
    last = {"view": full_view(grid)}  # the tokens the current step kept

    def recorded(frame, text):
        if handle is None:
            return act(frame, text)
        with handle.record() as records:
            action = act(frame, text)
        last["view"] = token_view(records, grid=grid) if records else full_view(grid)
        return action

    def on_step(i, frame, action):
        steps.append(StepView(i, frame, cells[-1], action, last["view"]))
        if action != (0, 0):
            cells.append(reach.move(cells[-1], action))

    try:
        trace = reach.run_episode(spec, recorded, on_step=on_step)
    finally:
        if handle is not None:
            handle.unwrap()
    return Replay(spec, method, budget, steps, trace.success, trace.cells[-1])


def _grid(policy) -> tuple[int, int]:
    vc = policy.llava.config.vision_config
    side = vc.image_size // vc.patch_size
    return (side, side)


def draw_step(rep: Replay, i: int, width: int = 336) -> Image.Image:
    """Step ``i``: the frame with the kept tokens, the goal (a cyan cross and the success radius),
    the path so far and the action (an arrow from the agent's cell), all in the frame's
    coordinates (the camera follows the agent: :func:`reach.world_to_frame`)."""
    sv = rep.steps[i]
    img = draw_overlay(sv.frame, sv.view, width, outline=sv.view.n_kept < sv.view.owner.size)
    d = ImageDraw.Draw(img)
    s = width / reach.FRAME

    def at(xy):
        return tuple(v * s for v in reach.world_to_frame(xy, sv.cell))

    gx, gy = at(rep.spec.goal)
    r = reach.RADIUS / reach.VIEW_SCALE * s
    d.ellipse([gx - r, gy - r, gx + r, gy + r], outline=GOAL_COLOUR, width=2)
    d.line([gx - 5, gy, gx + 5, gy], fill=GOAL_COLOUR, width=2)
    d.line([gx, gy - 5, gx, gy + 5], fill=GOAL_COLOUR, width=2)
    path = [at(reach.cell_centre(st.cell)) for st in rep.steps[: i + 1]]
    if len(path) > 1:
        d.line(path, fill=PATH_COLOUR, width=2)
    x0, y0 = path[-1]
    nxt = reach.move(sv.cell, sv.action)
    x1, y1 = at(reach.cell_centre(nxt))
    if (x1, y1) != (x0, y0):
        d.line([x0, y0, x1, y1], fill=(255, 255, 255), width=3)
        ang = np.arctan2(y1 - y0, x1 - x0)
        for da in (2.6, -2.6):
            d.line([x1, y1, x1 + 9 * np.cos(ang + da), y1 + 9 * np.sin(ang + da)], fill=(255, 255, 255), width=3)
    else:
        d.ellipse([x0 - 6, y0 - 6, x0 + 6, y0 + 6], outline=(255, 255, 255), width=3)
    return img


def step_caption(rep: Replay, i: int) -> str:
    sv = rep.steps[i]
    n = sv.view.owner.size
    stop = " (stop)" if sv.action == (0, 0) else ""
    return f"step {sv.step}: (dx, dy) = ({sv.action[0]:+d}, {sv.action[1]:+d}){stop}, tokens {sv.view.n_tokens}/{n}"


def episode_text(rep: Replay) -> str:
    """Markdown: the instruction, the outcome, the steps and the tokens kept per step."""
    kept = [sv.view.n_tokens for sv in rep.steps]
    setting = "unpruned" if rep.method == "none" else f"{rep.method} at keep {100 * rep.budget:g} %"
    verdict = "**success**" if rep.success else "**failure**"
    return (f"*{rep.spec.instruction}* — {setting}: {verdict} after {len(rep.steps)} step(s), "
            f"ending in cell {rep.final_cell} (goal within {reach.RADIUS:g} px of the shape's centroid). "
            f"Visual tokens per step: {kept}.")


class LazyPolicy(LazyModel):
    """``(policy, processor)``, or a loader called on first use (once; a failure is retried)."""

    kind = tuple

    def __init__(self, source=None):
        if source is None:
            from vlmprune.tools.eval_reach import load_policy

            source = load_policy
        super().__init__(source)
