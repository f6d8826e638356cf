"""What a wrapped model reports: tokens in/out per stage and image, FLOPs and KV bytes saved."""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass
class Stats:
    """Filled by the adapter at every prefill; ``wrap().stats`` returns :meth:`as_dict`."""

    llm: LLMShape | None = None
    prefills: int = 0
    points: list[dict] = field(default_factory=list)
    llm_visual_tokens: list[int] = field(default_factory=list)
    layer_lengths: list[list[int]] = field(default_factory=list)  # per batch row, per LLM layer, last prefill
    full_lengths: list[int] = field(default_factory=list)  # per batch row, unpruned prompt length
    select_seconds: float = 0.0

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
        if self.llm is not None and self.layer_lengths:
            full = sum(self.llm.prefill_flops([n] * self.llm.layers) for n in self.full_lengths)
            pruned = sum(self.llm.prefill_flops(lengths) for lengths in self.layer_lengths)
            kv_full = sum(self.llm.kv_bytes([n] * self.llm.layers) for n in self.full_lengths)
            kv_pruned = sum(self.llm.kv_bytes(lengths) for lengths in self.layer_lengths)
            out.update(
                llm_prefill_flops=pruned,
                llm_prefill_flops_unpruned=full,
                flops_saved=full - pruned,
                kv_cache_bytes=kv_pruned,
                kv_cache_bytes_unpruned=kv_full,
                kv_bytes_saved=kv_full - kv_pruned,
            )
        return out
