"""ToMeSD's 2-D stride partition (arXiv 2303.17604): one destination token per ``sy x sx`` window
of a token grid, every other token a source; the sets :func:`.merging.bipartite_soft_matching`
takes as ``sets``."""

from __future__ import annotations

import torch


def stride_partition(
    h: int, w: int, sx: int, sy: int, generator: torch.Generator | None = None, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sources, destinations)``: 1-D raster indices into an ``h x w`` grid (rows of ``w``).

    The grid's top-left ``(h // sy) * sy`` by ``(w // sx) * sx`` part is cut into ``sy x sx``
    windows; each window gives one destination: its top-left token (``generator`` None, tomesd's
    ``use_rand=False``) or the token at one ``torch.randint(sy * sx)`` draw per window, all
    windows drawn at once as an ``(h // sy, w // sx, 1)`` tensor from ``generator`` (tomesd's
    draw, so one generator state gives the package's partition); tokens of the border rows and
    columns no window covers are sources. Both sets come in the order ``torch.argsort`` of the
    grid marked -1 (destination) / 0 (source) gives on ``device`` (default CPU), the order tomesd's
    ``bipartite_soft_matching_random2d`` lays them out (attention then sums in the same order).
    """
    if not (isinstance(sx, int) and isinstance(sy, int) and sx >= 1 and sy >= 1):
        raise ValueError(f"parameters 'sx' and 'sy' must be ints >= 1, got sx={sx!r}, sy={sy!r}")
    rows, cols = h // sy, w // sx
    if rows < 1 or cols < 1:
        raise ValueError(f"a {h} x {w} token grid holds no {sy} x {sx} window (parameters 'sy', 'sx')")
    device = torch.device("cpu") if device is None else device
    if generator is None:
        pick = torch.zeros(rows, cols, 1, dtype=torch.long, device=device)
    else:
        pick = torch.randint(sy * sx, size=(rows, cols, 1), generator=generator, device=generator.device).to(device)
    windows = torch.zeros(rows, cols, sy * sx, dtype=torch.long, device=device).scatter_(2, pick, -1)
    grid = torch.zeros(h, w, dtype=torch.long, device=device)
    grid[: rows * sy, : cols * sx] = windows.view(rows, cols, sy, sx).transpose(1, 2).reshape(rows * sy, cols * sx)
    order = grid.reshape(1, -1, 1).argsort(dim=1).flatten()
    n_dst = rows * cols
    return order[n_dst:], order[:n_dst]
