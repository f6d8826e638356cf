"""The demo's vision-Mamba view, without Gradio: the embedded Vim (easyvqa-cls) run unpruned and
with the methods that act on a Vim, on one image, and the text the view shows.

* :class:`VimDemoModel` runs one method (or none) on one image with its selections recorded
  (:meth:`VimDemoModel.run` -> :class:`~.vit_view.ViTResult`, ``task="classification"``);
  :func:`load_vim_demo` builds it from ``assets/embedded_vim`` (offline).
* The tokens alive after each pruning point come from :func:`~.vit_view.point_views` and are drawn
  by :func:`~.vit_view.draw_point` (ToMe's merge groups coloured; dropped patches dimmed): ToP-ViM
  at its three points, DivPrune / uniform / random at the boundary ``mixer:L``, ToMe after every
  block.
* :func:`vim_prediction` / :func:`prediction_text`: colour and shape (the head's 24 classes are
  ``colour * 3 + shape``, :func:`vlmprune.embedded.vim_model.label_of`) beside the unpruned
  model's; :func:`result_text`: tokens per point, the blocks' token load, time.

Methods (:data:`VIM_METHODS`): ToP-ViM and the boundary methods keep ``budget`` patch tokens
(ToP-ViM: at the end of its schedule), ToMe merges ``r`` per block.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

import vlmprune
from vlmprune.embedded.vit import COLORS, SHAPES

from .engine import DemoError, LazyModel, describe_error, load_image
from .view import full_view
from .vit_view import ViTResult, point_views

__all__ = ["VIM_METHODS", "LazyVim", "VimDemoModel", "VimSetting", "load_vim_demo", "prediction_text", "result_text",
           "vim_prediction", "vim_wrap_options"]

#: the methods the Vim adapter serves (tests/cases_vim.py ``VimCase.served``)
VIM_METHODS = ("top_vim", "tome", "divprune", "uniform", "random")
BUDGET_METHODS = ("top_vim", "divprune", "uniform", "random")


@dataclass
class VimSetting:
    """``budget``: patch tokens kept (16, a quarter of the embedded Vim's 64); ``boundary_layer``:
    where the boundary methods prune (None: the adapter's default, depth // 2); ``r``: ToMe's
    tokens merged per block (6: about half the patches reach the last block, as in the Vim
    benchmark's ToMe rows)."""

    budget: int = 16
    boundary_layer: int | None = None
    r: int = 6


def vim_wrap_options(method: str, setting: VimSetting) -> dict:
    """The keyword arguments of :func:`vlmprune.wrap` for ``method`` at ``setting``."""
    if method == "tome":
        return {"r": int(setting.r)}
    if method == "top_vim":
        return {"budget": int(setting.budget)}
    if method in BUDGET_METHODS:
        return {"budget": int(setting.budget), "boundary_layer": setting.boundary_layer}
    raise DemoError(f"method must be one of {', '.join(VIM_METHODS)} in the Vim view; got {method!r}")


def setting_text(method: str, options: dict) -> str:
    """``r = 6 per block`` / ``16 tokens (ToP-ViM schedule)`` / ``16 tokens at mixer:3``."""
    if method == "tome":
        return f"r = {options['r']} per block"
    if method == "top_vim":
        return f"{options['budget']} tokens (ToP-ViM schedule)"
    return f"{options['budget']} tokens at mixer:{options['boundary_layer']}"


def vim_prediction(logits: torch.Tensor) -> dict[str, tuple[str, float]]:
    """``{"colour": (name, p), "shape": (name, p)}`` of the first image's ``[.., 24]`` logits,
    each the argmax of the class probabilities summed over the other label."""
    p = logits[0].float().softmax(-1).view(len(COLORS), len(SHAPES))
    colour, shape = p.sum(1), p.sum(0)
    c, s = int(colour.argmax()), int(shape.argmax())
    return {"colour": (COLORS[c], float(colour[c])), "shape": (SHAPES[s], float(shape[s]))}


def prediction_text(logits: torch.Tensor, base: torch.Tensor | None = None) -> str:
    """Markdown: the predicted colour and shape; ``base``: the unpruned logits, for agreement."""
    pred = vim_prediction(logits)
    text = " · ".join(f"{k}: **{v[0]}** ({v[1]:.2f})" for k, v in pred.items())
    if base is not None:
        same = {k: v[0] for k, v in pred.items()} == {k: v[0] for k, v in vim_prediction(base).items()}
        text += "  \n" + ("✓ same as unpruned" if same else "✗ differs from unpruned")
    return text


def block_load(points: list[dict], depth: int, n: int) -> float:
    """Tokens (class token included) the ``depth`` blocks scan, summed, over the unpruned count
    (:func:`vlmprune.tools.eval_vim.token_blocks`, the benchmark's ``token blocks``)."""
    from vlmprune.tools.eval_vim import token_blocks

    return token_blocks(points, n, depth)


class VimDemoModel:
    """A Vim classifier (the Vim adapter's ``VimClassifier``) and a lock held from wrap to
    unwrap; ``preprocess``: PIL images and a side -> ``pixel_values`` (default: the embedded
    ViT's recipe, which the embedded Vim was trained with)."""

    def __init__(self, model, name: str = "vim", description: str | None = None, preprocess: Callable | None = None):
        from vlmprune.adapters import find_adapter

        info = find_adapter(model).info()
        if info.family != "vim":
            raise DemoError(f"{name}: the Vim view runs vision Mamba classifiers; this is a {info.family!r} model")
        if preprocess is None:
            from vlmprune.embedded.vit import preprocess
        self.model = model.eval()
        self.name = name
        self.description = description or name
        self.preprocess = preprocess
        self.lock = threading.RLock()
        self.grid, self.n_tokens, self.depth = tuple(info.grid), int(info.n_tokens), int(info.encoder_layers)
        self.image_size = int(model.config.image_size)
        self.default_boundary = max(1, self.depth // 2)

    def summary(self) -> str:
        return (f"{self.description}: {self.depth} blocks, {self.grid[0]}x{self.grid[1]} = {self.n_tokens} patch "
                f"tokens at {self.image_size} px, class token in the middle")

    def _forward(self, pixels):
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model(pixels)
        return out, time.perf_counter() - start

    def run(self, image, method: str | None = None, setting: VimSetting | None = None) -> ViTResult:
        """The model on ``image`` unpruned (``method=None``) or with ``method`` at ``setting``.
        Method and setting errors come back in ``.error``; a bad image raises :class:`DemoError`."""
        image = load_image(image)
        seen = image.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
        pixels = self.preprocess([image], self.image_size)
        if method is None:
            with self.lock:
                output, seconds = self._forward(pixels)
            return ViTResult(None, "classification", output=output, final=full_view(self.grid), seconds=seconds, image=seen)
        try:
            options = vim_wrap_options(method, setting or VimSetting())
        except DemoError as exc:
            return ViTResult(method, "classification", image=seen, error=str(exc))
        if options.get("boundary_layer", 0) is None:
            options["boundary_layer"] = self.default_boundary
        with self.lock:
            try:
                handle = vlmprune.wrap(self.model, method, **options)
            except Exception as exc:  # noqa: BLE001 - bad budget or option
                return ViTResult(method, "classification", options, image=seen, error=describe_error(exc))
            try:
                with handle.record() as records:
                    output, seconds = self._forward(pixels)
                stats = handle.stats
            except Exception as exc:  # noqa: BLE001 - reported in the page
                return ViTResult(method, "classification", options, image=seen, error=describe_error(exc))
            finally:
                handle.unwrap()
        if not records:
            return ViTResult(method, "classification", options, output=output, seconds=seconds, stats=stats, image=seen,
                             error="the method was never called (nothing was pruned)")
        views = point_views(records, records[0].grid or self.grid)
        return ViTResult(method, "classification", options, output=output, views=views, records=list(records),
                         final=views[-1][1], seconds=seconds, stats=stats, image=seen)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def result_text(result: ViTResult, model: VimDemoModel, base: ViTResult | None = None) -> str:
    """Markdown under a column: the prediction (beside the unpruned one), the points with their
    counts, the blocks' token load and the time; or the error."""
    if not result.ok:
        return f"**⚠ error:** {result.error}"
    lines = [prediction_text(result.output, None if base is None or not base.ok else base.output)]
    n = model.n_tokens
    if result.method is None:
        return "  \n".join(lines + [f"tokens: **{n}** patch tokens + the class token", f"time: {_ms(result.seconds)}"])
    points = result.stats.get("points", [])
    lines.append(f"{setting_text(result.method, result.options)} · patch tokens after the last point: "
                 f"**{points[-1]['out'][0]}** of {n}")
    lines.append("points: " + " → ".join(f"{p['point']} {p['in'][0]}→{p['out'][0]}" for p in points))
    timing = f"time: {_ms(result.seconds)}"
    if base is not None and base.ok and result.seconds > 0:
        timing += f" (unpruned {_ms(base.seconds)}, ×{base.seconds / result.seconds:.2f})"
    lines.append(f"tokens through the blocks: {100 * block_load(points, model.depth, n):.0f} % of unpruned · {timing}")
    return "  \n".join(lines)


def load_vim_demo() -> VimDemoModel:
    """The embedded Vim (:func:`vlmprune.embedded.vim_model.load_vim`); a :class:`DemoError`
    says what is missing (mambapy, the weights)."""
    try:
        from vlmprune.embedded.vim_model import load_vim

        model = load_vim()
    except Exception as exc:  # noqa: BLE001 - mambapy missing, weights absent
        raise DemoError(f"Could not load the embedded Vim ({describe_error(exc)}); it needs mambapy "
                        "(pip install 'vlmprune[vim]') and assets/embedded_vim.") from None
    return VimDemoModel(model, name="embedded-vim", description="embedded Vim (6 bidirectional Mamba blocks, easyvqa-cls)")


class LazyVim(LazyModel):
    """A :class:`VimDemoModel`, or a loader called on first use (once; a failure is retried)."""

    kind = VimDemoModel

    def __init__(self, source: VimDemoModel | Callable[[], VimDemoModel] = load_vim_demo):
        super().__init__(source)
