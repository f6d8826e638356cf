"""Stages whose removed tokens come back when a module exits (``StageSpec.restore == "exit"``,
ToMeSD's ``x = x + restore(branch(apply(x)))`` around each residual branch, at every step)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vlmprune.reduction import FILLS, Reduction

from .base import Installed, read_arg, write_arg


def install_exit_restore(
    installed: Installed,
    branch: nn.Module,
    reduction_for: Callable[[torch.Tensor], Reduction],
    hidden: str = "hidden_states",
    aligned: dict[str, int] | None = None,
    fill: str = "copy",
) -> None:
    """Run ``branch`` (a residual branch: a block's attention or MLP, whose output its caller adds
    to the stream) on the reduced tokens and hand its caller all of them back.

    A forward pre-hook calls ``reduction_for(x)`` with the branch's hidden-state input ``x``
    ``[B, N (+ prefix), C]`` (argument ``hidden``, by name or first position) and passes
    ``reduction.tokens(x)`` instead (merged values in place); the keyword arguments named in
    ``aligned`` (name -> token dimension, e.g. ``{"attention_mask": 1}``) get
    ``reduction.apply``. A forward hook returns ``reduction.restore(output, fill)`` (the first
    element of a tuple output): with ``fill="copy"`` (ToMeSD's unmerge, the default) a merged
    token gets its kept token's output, a dropped one zeros, so the caller's residual add leaves
    it as it was. Both hooks are recorded in ``installed``."""
    if fill not in FILLS:
        raise ValueError(f"parameter 'fill' must be one of {list(FILLS)}, got {fill!r}")
    aligned = dict(aligned or {})
    pending: list[Reduction] = []  # the reduction of the call in progress (LIFO for nested calls)

    def enter(module, args, kwargs):
        x = read_arg(args, kwargs, hidden, 0)
        red = reduction_for(x)
        if red.ragged:
            raise ValueError("restore at exit needs one count per row ([B, k] keep), got per-image keep lists")
        pending.append(red)
        args, kwargs = write_arg(args, kwargs, hidden, red.tokens(x), 0)
        for name, dim in aligned.items():
            if kwargs.get(name) is not None:
                kwargs[name] = red.apply(kwargs[name], dim)
        return args, kwargs

    def leave(module, args, kwargs, output):
        red = pending.pop()
        if isinstance(output, (tuple, list)):
            return type(output)((red.restore(output[0], fill), *output[1:]))
        return red.restore(output, fill)

    installed.hook(branch.register_forward_pre_hook(enter, with_kwargs=True))
    installed.hook(branch.register_forward_hook(leave, with_kwargs=True))
