"""The per-wrap runtime: holds the method, budget and stats, builds contexts and runs the method."""

from __future__ import annotations

import torch

from vlmprune.context import ModelInfo, Point, Selection, SelectionRecord, Signals, TokenContext

from .base import Plan, new_generator


class Runtime:
    """Shared by the hooks of one wrapped model. ``state`` is reset at every prefill."""

    def __init__(self, plan: Plan, info: ModelInfo):
        self.plan = plan
        self.method = plan.method
        self.info = info
        self.stats = plan.stats
        self.state: dict = {}
        self.image_states: dict[int, dict] = {}
        self.n_visual = info.n_visual
        self.grid = info.grid
        self.generator: torch.Generator | None = None

    def begin(self, n_visual: int, grid: tuple[int, int], device: torch.device) -> None:
        """A new prefill with images: fresh method state and generator, the run-time grid."""
        self.state = {}
        self.image_states = {}
        self.n_visual = n_visual
        self.grid = grid
        self.generator = new_generator(self.method.seed, device)
        self.stats.begin()

    def budget_at(self, point: Point) -> tuple[int, int]:
        target = self.plan.budget.resolve_target(self.n_visual)
        at = self.plan.budget.at(point, self.n_visual)
        return (target if at is None else at), target

    def context(
        self,
        point: Point,
        tokens: torch.Tensor,
        token_index: torch.Tensor,
        signals: Signals,
        images: list[int] | None = None,
        cls_token: torch.Tensor | None = None,
    ) -> TokenContext:
        budget, target = self.budget_at(point)
        n = tokens.shape[1]
        state = self.state.setdefault(tuple(images) if images is not None else "all", {})
        rows = tuple(int(i) for i in images) if images is not None else tuple(range(tokens.shape[0]))
        return TokenContext(
            tokens=tokens,
            stage=point.stage,
            layer=point.layer,
            budget=min(budget, n),
            target=min(target, n),
            grid=self.grid,
            token_index=token_index,
            signals=signals,
            state=state,
            cls_token=cls_token,
            info=self.info,
            generator=self.generator,
            images=rows,
            image_state=[self.image_states.setdefault(i, {}) for i in rows],
        )

    def run_method(self, ctx: TokenContext) -> Selection:
        started = self.stats.timer.start(ctx.tokens.device)
        with torch.no_grad():
            sel = self.method.select(ctx)
        self.stats.timer.stop(started)
        self.stats.record_point(str(ctx.point), [ctx.n] * ctx.tokens.shape[0], sel.counts())
        if self.plan.recorders:
            grid = tuple(ctx.grid) if ctx.grid else None
            record = SelectionRecord(ctx.point, ctx.token_index.detach().clone(), sel, grid, tuple(ctx.images))
            for recorder in self.plan.recorders:
                recorder.append(record)
        return sel
