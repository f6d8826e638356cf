"""Reversible reductions: one :class:`Selection` applied to every tensor aligned with the tokens,
and undone (ToMe's merge and unmerge as one object). Pure torch, no model knowledge."""

from __future__ import annotations

import torch

from .context import Selection, TokenContext

FILLS = ("copy", "zero")


class Reduction:
    """A selection over ``n`` tokens (``ctx.tokens``), ready to reduce aligned tensors and to
    bring all ``n`` back.

    Tensors are batch-first (row ``i`` is image ``i`` of the selection) with the tokens along
    ``dim``. A tensor whose token length is ``n + prefix`` holds the stage's prefix tokens (CLS,
    registers: :attr:`StageSpec.prefix`) first; they pass through untouched. A tensor of length
    ``n`` holds the tokens only. Any other length is refused.

    With ``[B, k]`` keep, results are tensors; with per-image keep lists (``ragged``),
    :meth:`apply`, :meth:`tokens` and :attr:`sizes` give one tensor per row (the batch dimension
    dropped, tokens along ``dim - 1``), and :meth:`restore` takes such a list. Appended tokens
    (``Selection.extra``) and ``keep_cls`` are not part of the reduction: the adapter adds them.

    ``sizes``: how many original tokens each of the ``n`` current tokens stands for (the previous
    point's :attr:`sizes`; None: one each), so sizes accumulate over points (ToMe's proportional
    attention).
    """

    def __init__(
        self,
        selection: Selection,
        n: int,
        prefix: int = 0,
        sizes: torch.Tensor | list[torch.Tensor] | None = None,
        ctx: TokenContext | None = None,
    ):
        self.selection = selection
        self.ctx = ctx
        self.n = n
        self.prefix = prefix
        self.keep = selection.keep
        self.ragged = isinstance(self.keep, (list, tuple))
        self._previous_sizes = sizes

    @classmethod
    def of(cls, selection: Selection, ctx: TokenContext, sizes=None) -> Reduction:
        """The reduction of ``selection`` made at ``ctx``: ``n = ctx.n``, the prefix from the
        stage's :class:`StageSpec` (0 where the context has no model info)."""
        spec = ctx.info.spec(ctx.stage) if ctx.info is not None else None
        return cls(selection, ctx.n, spec.prefix if spec is not None else 0, sizes, ctx)

    # -- reducing ------------------------------------------------------------------------------
    def apply(self, x: torch.Tensor, dim: int = 1):
        """``x`` reduced to the kept tokens (in keep's order) along ``dim``, prefix first."""
        dim = self._dim(x.dim(), dim)
        head, body = self._split(x, dim, self.n, "x")
        if self.ragged:
            return [_cat(_row(head, i), body[i].index_select(dim - 1, k.to(x.device)), dim - 1) for i, k in enumerate(self.keep)]
        return _cat(head, body.gather(dim, _index(self.keep.to(x.device), body.shape, dim)), dim)

    def tokens(self, x: torch.Tensor, spaces: tuple[str, ...] = ("tokens",)):
        """The kept tokens' values ``x [B, n (+ prefix), C]`` as :meth:`apply` gives them, with the
        selection's merged values (cast to ``x``'s dtype) in place of their own when its
        ``merged_space`` is one of ``spaces``, the value spaces ``x`` lives in (default: the
        tokens' own; an adapter whose tokens are already projected adds ``"projected"``)."""
        sel = self.selection
        if sel.merged is None or sel.merged_space not in spaces:
            return self.apply(x)
        head, _ = self._split(x, 1, self.n, "x")
        if self.ragged:
            return [_cat(_row(head, i), m.to(x.dtype), 0) for i, m in enumerate(sel.merged)]
        return _cat(head, sel.merged.to(x.dtype), 1)

    @property
    def sizes(self):
        """``[B, k]`` (ragged: one ``[k_i]`` per row): the original tokens each kept token stands
        for, the previous sizes of the tokens merged into it summed (``Selection.merge_map``:
        each token's position in keep, -1 dropped; a kept token maps to itself); without a
        merge map, each kept token's previous size. Previous sizes of length ``n + prefix`` give
        sizes with the prefix's first."""
        prev = self._previous_sizes
        if prev is None:
            keep = self.keep[0] if self.ragged else self.keep
            prev = torch.ones(len(self.keep), self.n, device=keep.device)
        elif isinstance(prev, (list, tuple)):  # one row per image (a ragged point's sizes)
            prev = torch.stack(list(prev))
        merge_map = self.selection.merge_map
        if merge_map is None:
            return self.apply(prev)
        out = []
        for i, (p, k) in enumerate(zip(prev, self._counts())):
            head, body = self._split(p, 0, self.n, "sizes")
            mm = merge_map[i].to(p.device)
            self._check_map(mm, k)
            summed = body.new_zeros(k).scatter_add_(0, mm.clamp(min=0), torch.where(mm >= 0, body, body.new_zeros(())))
            out.append(_cat(head, summed, 0))
        return out if self.ragged else torch.stack(out)

    # -- restoring -----------------------------------------------------------------------------
    def restore(self, y, fill: str = "copy", dim: int = 1) -> torch.Tensor:
        """All ``n`` tokens back in their original order from ``y`` (the kept tokens, as
        :meth:`apply` laid them out, prefix first when ``y`` has it), along ``dim``: a kept token
        gets its own entry of ``y``; with ``fill="copy"``, a token merged into a kept one gets
        that kept token's entry (ToMe's unmerge); with ``fill="zero"``, and for a dropped token
        (merge map -1, or no merge map), zeros. Returns ``[B, ..., n (+ prefix), ...]``; ragged:
        ``y`` is one tensor per row (tokens along ``dim - 1``), the result one stacked tensor."""
        if fill not in FILLS:
            raise ValueError(f"parameter 'fill' must be one of {list(FILLS)}, got {fill!r}")
        merge_map = self.selection.merge_map if fill == "copy" else None
        if self.ragged:
            rows = list(y)
            if len(rows) != len(self.keep):
                raise ValueError(f"y has {len(rows)} rows; the selection has {len(self.keep)}")
            dim = self._dim(rows[0].dim() + 1, dim)
            out = []
            for i, (row, keep) in enumerate(zip(rows, self.keep)):
                head, body = self._split(row, dim - 1, keep.shape[0], "y")
                mm = None if merge_map is None else merge_map[i].to(row.device)
                full = self._unmerge(body[None], keep.to(row.device)[None], None if mm is None else mm[None], dim)
                out.append(_cat(head, full[0], dim - 1))
            return torch.stack(out)
        dim = self._dim(y.dim(), dim)
        head, body = self._split(y, dim, self.keep.shape[1], "y")
        mm = None if merge_map is None else merge_map.to(y.device)
        return _cat(head, self._unmerge(body, self.keep.to(y.device), mm, dim), dim)

    def _unmerge(self, body: torch.Tensor, keep: torch.Tensor, merge_map: torch.Tensor | None, dim: int) -> torch.Tensor:
        """``body [B, ..., k, ...]`` spread over ``n`` tokens: entries of merged tokens copied
        from their kept token when ``merge_map`` is given, zeros elsewhere, kept ones in place."""
        shape = list(body.shape)
        shape[dim] = self.n
        if merge_map is None:
            full = body.new_zeros(shape)
        else:
            self._check_map(merge_map, keep.shape[1])
            full = body.gather(dim, _index(merge_map.clamp(min=0), shape, dim))
            dropped = (merge_map < 0).view(merge_map.shape[0], *([1] * (dim - 1)), self.n, *([1] * (body.dim() - dim - 1)))
            full = torch.where(dropped, full.new_zeros(()), full)
        return full.scatter(dim, _index(keep, body.shape, dim), body)

    # -- helpers -------------------------------------------------------------------------------
    def _counts(self) -> list[int]:
        return [int(k.shape[0]) for k in self.keep]

    def _check_map(self, merge_map: torch.Tensor, k: int) -> None:
        """``merge_map`` rows of ``n`` positions among ``k`` kept tokens (-1: dropped)."""
        if merge_map.shape[-1] != self.n or (merge_map.numel() and not -1 <= int(merge_map.min()) <= int(merge_map.max()) < k):
            raise ValueError(f"merge_map must give each of the {self.n} tokens a position in its row's {k} kept tokens or -1")

    @staticmethod
    def _dim(ndim: int, dim: int) -> int:
        dim = dim % ndim
        if dim == 0:
            raise ValueError("parameter 'dim' names the token dimension; dimension 0 is the batch")
        return dim

    def _split(self, x: torch.Tensor, dim: int, n: int, name: str):
        """(prefix part or None, token part) of ``x`` along ``dim``, whose length is ``n`` or
        ``n + prefix``."""
        length = x.shape[dim]
        if length == n:
            return None, x
        if self.prefix and length == n + self.prefix:
            return x.narrow(dim, 0, self.prefix), x.narrow(dim, self.prefix, n)
        valid = [n] + ([n + self.prefix] if self.prefix else [])
        raise ValueError(f"{name} has {length} tokens along dimension {dim}; expected one of {valid}")


def _index(keep: torch.Tensor, like: torch.Size | list[int], dim: int) -> torch.Tensor:
    """``keep [B, k]`` expanded to index a tensor shaped ``like`` along ``dim``."""
    view = [keep.shape[0]] + [1] * (len(like) - 1)
    view[dim] = keep.shape[1]
    shape = list(like)
    shape[dim] = keep.shape[1]
    return keep.view(view).expand(shape)


def _row(x: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if x is None else x[i]


def _cat(head: torch.Tensor | None, body: torch.Tensor, dim: int) -> torch.Tensor:
    return body if head is None else torch.cat([head, body], dim)
