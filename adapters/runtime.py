"""The per-wrap runtime: holds the method, budget and stats, builds contexts and runs the method."""

from __future__ import annotations

import torch

from vlmprune.context import ImagePart, ModelInfo, Point, SelectionRecord, Signals, State, TokenContext
from vlmprune.reduction import Reduction

from .base import Plan, check_selection, new_generator


class Runtime:
    """Shared by the hooks of one wrapped model. ``state`` (the forward scope's dict per group of
    images) and ``image_states`` (the images scope's dict per image) are new at every prefill;
    ``session`` (the plan's) lasts until ``handle.reset()``; ``step`` is the current forward's."""

    def __init__(self, plan: Plan, info: ModelInfo):
        self.plan = plan
        self.method = plan.method
        self.info = info
        self.stats = plan.stats
        self.state: dict = {}
        self.image_states: dict[int, dict] = {}
        self.session = plan.session
        self.step = 0
        self.n_visual = info.n_tokens
        self.grid = info.grid
        self.generator: torch.Generator | None = None

    def begin(self, n_visual: int, grid: tuple[int, int], device: torch.device) -> None:
        """A new prefill with images (one forward of the session, however many decode steps
        follow): the next step number, fresh forward and images state, a fresh generator, the
        run-time grid. A budget that is a function of the step is checked for this step first."""
        step = self.session.steps
        if self.plan.budget.per_step is not None:
            self.plan.budget.check(self.plan.points, self.method.name, step=step)
        self.session.steps = step + 1
        self.step = step
        self.state = {}
        self.image_states = {}
        self.n_visual = n_visual
        self.grid = grid
        self.generator = new_generator(self.method.seed, device)
        self.stats.begin()

    def budget_at(self, point: Point) -> tuple[int, int]:
        """(budget at ``point``, final target) per image of ``n_visual`` tokens at this step."""
        target = self.plan.budget.resolve_target(self.n_visual, self.step)
        at = self.plan.budget.at(point, self.n_visual, self.step)
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
        forward = self.state.setdefault(tuple(images) if images is not None else "all", {})
        rows = tuple(int(i) for i in images) if images is not None else tuple(range(tokens.shape[0]))
        state = State(forward, [self.image_states.setdefault(i, {}) for i in rows], self.session.state)
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
            step=self.step,
        )

    def run(
        self,
        point: Point,
        tokens: torch.Tensor,
        token_index: torch.Tensor,
        signals: Signals,
        images: list[int] | None = None,
        cls_token: torch.Tensor | None = None,
        parts: list[ImagePart] | None = None,
        sizes: torch.Tensor | list[torch.Tensor] | None = None,
    ) -> Reduction:
        """Run the method at ``point`` on ``tokens`` (context as :meth:`context` builds it;
        ``parts``: the rows' places in their whole images, :attr:`TokenContext.parts`): timed,
        counted in the stats, handed to the recorders, checked (:func:`.base.check_selection`).
        Returns the :class:`Reduction` (``.selection``, ``.ctx``; ``sizes``: the previous point's)."""
        ctx = self.context(point, tokens, token_index, signals, images=images, cls_token=cls_token)
        if parts is not None:
            ctx.parts = parts
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
        check_selection(sel, ctx, self.method.name)
        return Reduction.of(sel, ctx, sizes)
