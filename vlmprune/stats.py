"""What a wrapped model reports: tokens in/out per stage and image, FLOPs and KV bytes saved."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.compiler import is_compiling


@dataclass
class LLMShape:
    """The numbers the cost estimate needs, read from the language model's config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    bytes_per_value: int

    @property
    def params_per_layer(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attn + 3 * self.hidden * self.intermediate

    def prefill_flops(self, lengths: list[int]) -> float:
        """Multiply-adds x 2 of one prefill: linear layers plus causal attention scores and mixing."""
        return float(
            sum(2 * self.params_per_layer * n + 2 * self.heads * self.head_dim * n * n for n in lengths)
        )

    def kv_bytes(self, lengths: list[int]) -> int:
        return sum(2 * self.kv_heads * self.head_dim * self.bytes_per_value * n for n in lengths)

    def cost(self, stats: "Stats") -> dict[str, Any]:
        """Prefill FLOPs and KV-cache bytes of ``stats``' last prefill, pruned and unpruned
        (nothing before the first prefill)."""
        if not stats.layer_lengths:
            return {}
        full = sum(self.prefill_flops([n] * self.layers) for n in stats.full_lengths)
        pruned = sum(self.prefill_flops(lengths) for lengths in stats.layer_lengths)
        kv_full = sum(self.kv_bytes([n] * self.layers) for n in stats.full_lengths)
        kv_pruned = sum(self.kv_bytes(lengths) for lengths in stats.layer_lengths)
        return {
            "llm_prefill_flops": pruned,
            "llm_prefill_flops_unpruned": full,
            "flops_saved": full - pruned,
            "kv_cache_bytes": kv_pruned,
            "kv_cache_bytes_unpruned": kv_full,
            "kv_bytes_saved": kv_full - kv_pruned,
        }


class SelectTimer:
    """Seconds spent in ``Method.select``, measured without slowing the forward down. On CPU:
    ``perf_counter`` around each call. On CUDA (kernels run asynchronously: a host clock would
    stop before they finish): two CUDA events per call on the tokens' stream, whose times are
    summed, waiting for them, only when :attr:`seconds` is read (finished pairs are folded in
    along the way without waiting). While ``torch.compile`` traces, nothing is timed, so the
    graph is not split at a clock read."""

    #: how timing events and a device's current stream are made (tests substitute fakes)
    event = staticmethod(lambda: torch.cuda.Event(enable_timing=True))
    stream = staticmethod(lambda device: torch.cuda.current_stream(device))
    #: event pairs kept before finished ones are folded in
    fold_every = 64

    def __init__(self):
        self._seconds = 0.0
        self._pending: list[tuple] = []

    def start(self, device: torch.device):
        """Call before ``select``; hand the result to :meth:`stop`."""
        if is_compiling():
            return None
        if device.type == "cuda":
            begin = self.event()
            begin.record(self.stream(device))
            return device, begin
        return time.perf_counter()

    def stop(self, started) -> None:
        if started is None:
            return
        if isinstance(started, float):
            self._seconds += time.perf_counter() - started
            return
        device, begin = started
        end = self.event()
        end.record(self.stream(device))
        self._pending.append((begin, end))
        if len(self._pending) >= self.fold_every:
            self._fold(wait=False)

    def _fold(self, wait: bool) -> None:
        while self._pending:
            begin, end = self._pending[0]
            if wait:
                end.synchronize()
            elif not end.query():
                return
            self._seconds += begin.elapsed_time(end) / 1000.0  # milliseconds
            self._pending.pop(0)

    @property
    def seconds(self) -> float:
        self._fold(wait=True)
        return self._seconds

    def reset(self, seconds: float = 0.0) -> None:
        self._pending.clear()
        self._seconds = seconds


@dataclass
class Stats:
    """Filled by the adapter at every prefill; ``wrap().stats`` returns :meth:`as_dict`."""

    #: the adapter's :meth:`~vlmprune.adapters.Adapter.cost`, whose figures :meth:`as_dict` adds
    cost: Callable[["Stats"], dict[str, Any]] | None = None
    prefills: int = 0
    points: list[dict] = field(default_factory=list)
    llm_visual_tokens: list[int] = field(default_factory=list)
    layer_lengths: list[list[int]] = field(default_factory=list)  # per batch row, per LLM layer, last prefill
    full_lengths: list[int] = field(default_factory=list)  # per batch row, unpruned prompt length
    timer: SelectTimer = field(default_factory=SelectTimer)

    @property
    def select_seconds(self) -> float:
        """Seconds in ``Method.select`` since the wrap (or since set), see :class:`SelectTimer`."""
        return self.timer.seconds

    @select_seconds.setter
    def select_seconds(self, value: float) -> None:
        self.timer.reset(value)

    def begin(self) -> None:
        self.prefills += 1
        self.points = []
        self.llm_visual_tokens = []
        self.layer_lengths = []
        self.full_lengths = []

    def record_point(self, point: str, n_in: list[int], n_out: list[int]) -> None:
        self.points.append({"point": point, "in": list(n_in), "out": list(n_out)})

    def as_dict(self) -> dict:
        out = {
            "prefills": self.prefills,
            "points": [dict(p) for p in self.points],
            "llm_visual_tokens": list(self.llm_visual_tokens),
            "select_seconds": self.select_seconds,
        }
        if self.cost is not None:
            out.update(self.cost(self))
        return out
