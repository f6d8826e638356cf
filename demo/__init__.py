"""The Gradio demo: which visual tokens each pruning method keeps, and the answer with them.

``vlmprune demo`` or ``python -m vlmprune.demo`` (see :mod:`vlmprune.demo.app`). The drawing
(:mod:`.view`) and model-running (:mod:`.engine`) parts import without Gradio.
"""

from .engine import DEFAULT_MODEL, DemoError, DemoModel, ModelStore, RunResult, load_image, load_model, parse_budget
from .view import TokenView, draw_heatmap, draw_overlay, token_view

__all__ = [
    "DEFAULT_MODEL",
    "DemoError",
    "DemoModel",
    "ModelStore",
    "RunResult",
    "TokenView",
    "build_app",
    "draw_heatmap",
    "draw_overlay",
    "load_image",
    "load_model",
    "main",
    "parse_budget",
    "token_view",
]


def build_app(*args, **kwargs):
    """:func:`vlmprune.demo.app.build_app` (imports Gradio)."""
    from .app import build_app as _build

    return _build(*args, **kwargs)


def main(argv=None):
    """:func:`vlmprune.demo.app.main`."""
    from .app import main as _main

    return _main(argv)
