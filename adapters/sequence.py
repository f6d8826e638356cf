"""Removing positions from a batch of sequences, consistently for every tensor that has a
sequence axis, at prefill and again at each decode step.

A :class:`SeqTransform` is built once from a ``keep`` mask ``[B, L]``. Rows may keep
different counts; shorter rows are left-filled with *invalid* entries that are masked
out everywhere (like left padding), so batched tensors stay rectangular and the last
position of every row is still its last real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _masked_value(mask: torch.Tensor):
    return False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min


@dataclass
class SeqTransform:
    index: torch.Tensor  # [B, L'] source position of each new position
    valid: torch.Tensor  # [B, L'] False for fill entries
    l_in: int  # sequence length this transform was built for (the prefix at decode)
    dropped_before: torch.Tensor  # [B, L'] how many kept-row tokens were removed before each new position
    dropped: torch.Tensor  # [B] tokens removed per row

    @staticmethod
    def from_keep(keep: torch.Tensor) -> SeqTransform:
        b, l_in = keep.shape
        counts = keep.sum(1)
        l_out = int(counts.max())
        order = torch.sort(keep.long(), dim=1, stable=True)
        index = order.indices[:, l_in - l_out :]
        valid = order.values[:, l_in - l_out :].bool()
        removed = (~keep).long().cumsum(1)
        return SeqTransform(
            index=index,
            valid=valid,
            l_in=l_in,
            dropped_before=removed.gather(1, index),
            dropped=l_in - counts,
        )

    @property
    def l_out(self) -> int:
        return self.index.shape[1]

    @property
    def has_fill(self) -> bool:
        return not bool(self.valid.all())

    # -- prefill ---------------------------------------------------------------------------------
    def seq(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Gather a tensor along its sequence axis ``dim`` (batch axis is the one before it,
        or absent / of size 1 for shared tensors such as cos/sin)."""
        dim = dim % x.dim()
        b = self.index.shape[0]
        shape = list(x.shape)
        if dim == 0:
            raise ValueError("the sequence axis cannot be the first axis")
        if shape[dim - 1] == 1 and b > 1:
            shape[dim - 1] = b
            x = x.expand(*shape)
        view = [1] * x.dim()
        view[dim - 1], view[dim] = b, self.l_out
        idx = self.index.view(view).expand(*shape[:dim], self.l_out, *shape[dim + 1 :])
        return x.gather(dim, idx)

    def mask2d(self, mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
        """A 2-D padding mask ``[B, l_in + extra]`` -> ``[B, l_out + extra]`` (``total`` = its length)."""
        if mask is None:
            if not self.has_fill:
                return None
            mask = torch.ones(self.index.shape[0], total, dtype=torch.long, device=self.index.device)
        head = mask[:, : self.l_in].gather(1, self.index) * self.valid.to(mask.dtype)
        return torch.cat([head, mask[:, self.l_in :]], dim=1)

    def mask4d(
        self, mask: torch.Tensor | None, prefill: bool, q_len: int, extra: int, width: int | None = None
    ) -> torch.Tensor | None:
        """A 4-D attention mask ``[B, 1, Q, l_in + extra]``: at prefill rows and columns are
        gathered; at decode only the first ``l_in`` columns (the cached prefix). ``width``: a
        static cache's fixed key length; the result is padded back to it with masked columns
        (the cache slots the removed positions leave unused)."""
        b = self.index.shape[0]
        if mask is None:
            if not self.has_fill:
                return None
            dev = self.index.device
            if prefill:
                mask = torch.ones(self.l_in, self.l_in, dtype=torch.bool, device=dev).tril()[None, None]
            else:
                mask = torch.ones(1, 1, q_len, self.l_in + extra, dtype=torch.bool, device=dev)
        neg = _masked_value(mask)
        if mask.shape[0] == 1 and b > 1:
            mask = mask.expand(b, *mask.shape[1:])
        if prefill:
            mask = mask.gather(2, self.index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
        cols = self.index[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1)
        head = mask[..., : self.l_in].gather(3, cols)
        head = head.masked_fill(~self.valid[:, None, None, :], neg)
        if prefill:  # a fill row must still see itself, or SDPA returns NaN for it
            eye = torch.eye(self.l_out, dtype=torch.bool, device=mask.device)
            fill_rows = (~self.valid)[:, None, :, None] & eye
            head = head.masked_fill(fill_rows, True if mask.dtype == torch.bool else 0.0)
        out = torch.cat([head, mask[..., self.l_in :]], dim=3)
        if width is not None and out.shape[3] < width:
            out = torch.cat([out, out.new_full((*out.shape[:3], width - out.shape[3]), neg)], dim=3)
        return out
