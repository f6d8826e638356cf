"""What a method kept, on the patch grid, and the two pictures the demo draws from it.

Pure functions of numpy / PIL / torch tensors (no Gradio, no model), so they are unit-tested
directly:

* :func:`token_view` combines the selections a method made at each of its pruning points into
  one :class:`TokenView` on the patch grid: which patches reach the LLM, which were merged into
  which kept token, and the method's scores at its last scoring point.
* :func:`draw_overlay`: the image as the model sees it, with the patch grid drawn over it:
  dropped patches dimmed, kept ones outlined, merged ones tinted with the colour of the token
  they were merged into (when the method gives a ``merge_map``).
* :func:`draw_heatmap`: the scores as a heatmap over the (greyed) image.
* :func:`model_view`: the processor's ``pixel_values`` turned back into an RGB picture (what the
  vision tower sees after resizing / cropping).
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from vlmprune.context import SelectionRecord

__all__ = [
    "TokenView",
    "draw_heatmap",
    "draw_overlay",
    "full_view",
    "legend_text",
    "model_view",
    "palette_colour",
    "placeholder",
    "rank_normalise",
    "token_view",
]

#: outline of a kept patch (RGB)
KEPT_COLOUR = (255, 210, 0)
#: how much of a dropped patch's brightness is left
DIM = 0.28


@dataclass
class TokenView:
    """What one method kept for one image, on the ``rows x cols`` patch grid (raster order).

    ``owner[r]``: the raster index of the kept token that patch ``r`` ended in: ``r`` itself when
    ``r`` is kept, another kept patch when ``r`` was merged into it, ``-1`` when it was dropped.
    ``scores``: the method's scores at ``score_point`` on the grid (NaN where no token was alive
    there), or None. ``extra``: tokens reaching the LLM that have no single patch of origin
    (a CLS token, PruMerge's summary token). ``points``: ``(point, tokens in, tokens out)``.
    """

    grid: tuple[int, int]
    owner: np.ndarray
    scores: np.ndarray | None = None
    score_point: str | None = None
    extra: int = 0
    points: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def kept(self) -> np.ndarray:
        return self.owner == np.arange(self.owner.size)

    @property
    def merged(self) -> np.ndarray:
        return (self.owner >= 0) & ~self.kept

    @property
    def dropped(self) -> np.ndarray:
        return self.owner < 0

    @property
    def n_kept(self) -> int:
        """Patches kept (with a single origin on the grid)."""
        return int(self.kept.sum())

    @property
    def n_tokens(self) -> int:
        """Visual tokens this method hands on at its last point (kept patches + extra tokens)."""
        return self.n_kept + self.extra


def full_view(grid: tuple[int, int]) -> TokenView:
    """Every patch kept (the unpruned model)."""
    n = grid[0] * grid[1]
    return TokenView(grid=tuple(grid), owner=np.arange(n))


def _np(x) -> np.ndarray:
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _row_of(record: SelectionRecord, image: int) -> int | None:
    """The batch row of ``image`` in a record (rows of an llm-stage call may be a subset)."""
    if not record.images:
        return image
    return record.images.index(image) if image in record.images else None


def token_view(records: Sequence, grid: tuple[int, int] | None = None, image: int = 0) -> TokenView:
    """Combine the selections a method made at its points (in the order they ran) into one
    :class:`TokenView` for image ``image`` of the forward.

    ``records``: :class:`~vlmprune.SelectionRecord` objects (``handle.record()``) or
    ``(point, token_index, selection)`` tuples.
    The kept set is what survives the last point (what reaches the LLM, or the LLM's later
    layers for LLM-stage methods); a token merged into another follows it, so a token merged into
    a token that a later point drops is dropped too. Tokens whose raster index is -1 (no single
    origin) are counted in ``extra`` when they survive.
    """
    recs = [r if isinstance(r, SelectionRecord) else SelectionRecord(*r) for r in records]
    if grid is None:
        grid = next((r.grid for r in recs if r.grid is not None), None)
    if grid is None:
        raise ValueError("token_view needs the patch grid (rows, cols)")
    rows, cols = int(grid[0]), int(grid[1])
    n = rows * cols
    owner = np.arange(n)
    scores, score_point, extra, points = None, None, 0, []
    for rec in recs:
        row = _row_of(rec, image)
        if row is None:
            continue
        tidx = _np(rec.token_index)[row].astype(np.int64)
        sel = rec.selection
        keep, _, added = sel.per_image()[row]
        keep = _np(keep).astype(np.int64).reshape(-1)
        kept_raster = tidx[keep]
        # representative of every token alive here: itself if kept, its merge target, or dropped
        rep = np.full(tidx.shape[0], -1, dtype=np.int64)
        rep[keep] = kept_raster
        merge_map = getattr(sel, "merge_map", None)
        if merge_map is not None:
            mm = _np(merge_map)[row].astype(np.int64).reshape(-1)
            merged = (mm >= 0) & (rep < 0)
            rep[merged] = kept_raster[mm[merged]]
        table = np.full(n + 1, -1, dtype=np.int64)  # raster -> new owner; slot n: "no origin"
        valid = tidx >= 0
        table[tidx[valid]] = rep[valid]
        owner = np.where(owner >= 0, table[np.where(owner >= 0, owner, n)], -1)
        n_added = 0 if added is None else int(added.shape[0])
        extra = int((kept_raster < 0).sum()) + n_added + int(bool(getattr(sel, "keep_cls", False)))
        points.append((str(rec.point), int(tidx.shape[0]), int(keep.size) + n_added + int(bool(getattr(sel, "keep_cls", False)))))
        sc = getattr(sel, "scores", None)
        if sc is not None:
            s = _np(sc)[row].astype(np.float64).reshape(-1)
            heat = np.full(n, np.nan)
            if s.shape[0] == tidx.shape[0]:
                heat[tidx[valid]] = s[valid]
            elif s.shape[0] == n:  # scores over the full grid
                heat = s.copy()
            scores, score_point = heat, str(rec.point)
    return TokenView(grid=(rows, cols), owner=owner, scores=scores, score_point=score_point, extra=extra, points=points)


# ----------------------------------------------------------------------------------- drawing


def model_view(pixel_values, image_mean=None, image_std=None, rescale_factor: float | None = 1 / 255) -> Image.Image:
    """The RGB picture a processor's ``pixel_values`` (``[3, H, W]`` or ``[1, 3, H, W]``) encode."""
    x = _np(pixel_values).astype(np.float64)
    if x.ndim == 4:
        x = x[0]
    x = x.transpose(1, 2, 0)
    if image_std is not None:
        x = x * np.asarray(image_std, dtype=np.float64)
    if image_mean is not None:
        x = x + np.asarray(image_mean, dtype=np.float64)
    x = x / (rescale_factor or 1 / 255) if rescale_factor else x
    return Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8), "RGB")


def palette_colour(index: int) -> tuple[int, int, int]:
    """A distinct, saturated colour per kept token (golden-ratio hues)."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _cell_maps(height: int, width: int, rows: int, cols: int, thickness: int):
    """Per-pixel raster index and a mask of pixels within ``thickness`` of their cell's border."""
    ys, xs = np.arange(height), np.arange(width)
    r = np.minimum(ys * rows // height, rows - 1)
    c = np.minimum(xs * cols // width, cols - 1)
    r_start = np.ceil(np.arange(rows) * height / rows).astype(int)
    r_end = np.ceil(np.arange(1, rows + 1) * height / rows).astype(int)
    c_start = np.ceil(np.arange(cols) * width / cols).astype(int)
    c_end = np.ceil(np.arange(1, cols + 1) * width / cols).astype(int)
    yin, ylen = ys - r_start[r], r_end[r] - r_start[r]
    xin, xlen = xs - c_start[c], c_end[c] - c_start[c]
    ybord = (yin < thickness) | (yin >= ylen - thickness)
    xbord = (xin < thickness) | (xin >= xlen - thickness)
    idx = r[:, None] * cols + c[None, :]
    border = ybord[:, None] | xbord[None, :]
    return idx, border


def _resized(image: Image.Image, width: int) -> np.ndarray:
    image = image.convert("RGB")
    height = max(1, round(width * image.height / image.width))
    return np.asarray(image.resize((width, height), Image.BICUBIC), dtype=np.float64)


def draw_overlay(image: Image.Image, view: TokenView, width: int = 448, outline: bool = True) -> Image.Image:
    """The image (as the model sees it) with the patch grid over it: dropped patches dimmed,
    kept ones outlined, merged ones tinted with the colour of the kept token they went into
    (which is then outlined in that colour instead of the default). ``outline=False``: only the
    faint grid over kept patches (for the unpruned model, where every patch is kept)."""
    rows, cols = view.grid
    arr = _resized(image, width)
    height = arr.shape[0]
    idx, thin = _cell_maps(height, width, rows, cols, 1)
    _, thick = _cell_maps(height, width, rows, cols, max(1, round(width / cols / 10)))
    owner = view.owner
    kept, merged, dropped = view.kept, view.merged, view.dropped
    out = arr.copy()
    # faint grid everywhere
    out[thin] = out[thin] * 0.75
    d = dropped[idx]
    out[d] = arr[d] * DIM + 18
    colour_of = np.zeros((owner.size, 3))
    targets = np.unique(owner[merged])
    for t in targets:
        colour_of[t] = palette_colour(int(t))
    m = merged[idx]
    if m.any():
        out[m] = arr[m] * 0.45 + colour_of[owner[idx[m]]] * 0.55
    # outlines of kept patches: merge targets in their colour, others in the default colour
    is_target = np.zeros(owner.size, dtype=bool)
    is_target[targets] = True
    edge = thick & kept[idx] & outline
    out[edge & ~is_target[idx]] = KEPT_COLOUR
    te = edge & is_target[idx]
    out[te] = colour_of[idx[te]]
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


#: anchors of a perceptually ordered dark-to-bright colour map (inferno-like), 0 -> 1
_CMAP = np.array(
    [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164)],
    dtype=np.float64,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """``[...]`` values in [0, 1] -> ``[..., 3]`` RGB (0..255) on :data:`_CMAP`."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_CMAP) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(_CMAP) - 1)
    t = (v - lo)[..., None]
    return _CMAP[lo] * (1 - t) + _CMAP[hi] * t


def rank_normalise(scores: np.ndarray) -> np.ndarray:
    """Scores -> [0, 1] by dense rank (ties equal; NaN stays NaN). Attention scores are often
    dominated by a few tokens; the rank shows the order that a top-k selection follows."""
    out = np.full(scores.shape, np.nan)
    finite = np.isfinite(scores)
    if not finite.any():
        return out
    uniq, inv = np.unique(scores[finite], return_inverse=True)
    out[finite] = inv / max(1, len(uniq) - 1) if len(uniq) > 1 else 0.5
    return out


def draw_heatmap(image: Image.Image, view: TokenView, width: int = 448, outline_kept: bool = True) -> Image.Image | None:
    """The method's scores (by rank, bright = high) over the greyed image; patches with no score
    at that point (dropped earlier) are left grey. None when the method gives no scores."""
    if view.scores is None:
        return None
    rows, cols = view.grid
    arr = _resized(image, width)
    grey = arr.mean(-1, keepdims=True).repeat(3, -1)
    height = arr.shape[0]
    idx, thin = _cell_maps(height, width, rows, cols, 1)
    norm = rank_normalise(np.asarray(view.scores, dtype=np.float64))
    heat = colormap(norm)[idx]
    has = np.isfinite(norm)[idx]
    out = grey * 0.5 + 40
    out[has] = grey[has] * 0.3 + heat[has] * 0.7
    if outline_kept:
        edge = thin & view.kept[idx]
        out[edge] = out[edge] * 0.3 + 255 * 0.7
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def placeholder(image: Image.Image, text: str, width: int = 448) -> Image.Image:
    """The image greyed and darkened with ``text`` in the middle (e.g. "no scores")."""
    from PIL import ImageDraw, ImageFont

    arr = _resized(image, width)
    out = Image.fromarray(np.clip(arr.mean(-1) * 0.35 + 30, 0, 255).astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(out)
    try:
        font = ImageFont.load_default(size=max(12, width // 22))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    box = draw.textbbox((0, 0), text, font=font)
    xy = ((out.width - (box[2] - box[0])) // 2, (out.height - (box[3] - box[1])) // 2)
    draw.text(xy, text, fill=(235, 235, 235), font=font)
    return out


def legend_text(view: TokenView) -> str:
    """One line: patches kept / merged / dropped."""
    parts = [f"{view.n_kept} kept"]
    if view.merged.any():
        parts.append(f"{int(view.merged.sum())} merged")
    parts.append(f"{int(view.dropped.sum())} dropped")
    if view.extra:
        parts.append(f"+{view.extra} token{'s' if view.extra > 1 else ''} with no single patch")
    return ", ".join(parts) + f" of {view.owner.size} patches"
