"""Hand-made token contexts for the methods' planted-example tests."""

from __future__ import annotations

import torch

from vlmprune.context import ModelInfo, Signals, TokenContext

SMALL = ModelInfo("test", 64, (8, 8), True, 4, 2, 4, ("encoder", "projector", "llm"))


def make_context(
    tokens: torch.Tensor,
    budget: int,
    signals: dict,
    info: ModelInfo = SMALL,
    stage: str = "projector",
    layer: int | None = None,
    token_index: torch.Tensor | None = None,
    state: dict | None = None,
    image_state: list[dict] | None = None,
    target: int | None = None,
    seed: int = 0,
) -> TokenContext:
    """A context over ``tokens [B, N, C]`` whose signals are the given callables."""
    b, n, _ = tokens.shape
    return TokenContext(
        tokens=tokens,
        stage=stage,
        layer=layer,
        budget=budget,
        target=budget if target is None else target,
        grid=info.grid,
        token_index=torch.arange(n).expand(b, -1) if token_index is None else token_index,
        signals=Signals(signals),
        state={} if state is None else state,
        info=info,
        generator=torch.Generator().manual_seed(seed),
        images=tuple(range(b)),
        image_state=[{} for _ in range(b)] if image_state is None else image_state,
    )
