"""Budgets: how many visual tokens to keep per image, at each pruning point."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from .context import Point

BudgetValue = Union[int, float]
#: how a fraction ``f`` of ``n`` tokens becomes a count (``Method.fraction_rounding``)
ROUNDINGS = ("round", "floor")


def _check_value(value, where: str, n: int | None = None, of: str = "the model has") -> None:
    """Refuse a budget value that is not an int in ``[1, n]`` (``n`` None: at least 1) or a
    float in (0, 1] (NaN and inf included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"budget{where} must be an int (tokens per image) or a float in (0, 1] (fraction kept), "
            f"got {value!r}"
        )
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"budget{where} as a fraction must be in (0, 1], got {value}")
    elif n is None:
        if value < 1:
            raise ValueError(f"budget{where} must be at least 1 token per image, got {value}")
    elif not 0 < value <= n:
        raise ValueError(f"budget{where} must be in [1, {n}] tokens per image ({of} {n}), got {value}")


def _resolve_value(value: BudgetValue, n: int, where: str, rounding: str = "round") -> int:
    _check_value(value, where, n)
    if isinstance(value, float):
        return max(1, round(value * n) if rounding == "round" else int(value * n))
    return value


@dataclass(frozen=True)
class Budget:
    """A final target plus optional per-point values.

    ``Budget.parse(64)``, ``Budget.parse(0.25)``, or a schedule
    ``Budget.parse({"encoder": 192, "llm:8": 0.5, 16: 0.25})`` whose keys are a stage the
    model's adapter names (``"projector"``, ``"vit"``), ``"stage:layer"`` or an int (an LLM
    layer), checked against the method's points at ``wrap()``; the last entry in pruning order
    is the final target unless ``"target"`` is given. ``rounding``: how a fraction ``f`` of ``n``
    tokens becomes a count, ``"round"`` (``max(1, round(n * f))``) or ``"floor"``
    (``max(1, int(n * f))``); ``wrap()`` sets it from the method's ``fraction_rounding``.

    ``Budget.parse(lambda step: ...)``: a budget that depends on the forward's step (``ctx.step``:
    a control step, a denoising step), kept in ``per_step``; the function returns an int, a float
    or a schedule dict for that step, is called again whenever the budget is resolved (make it
    depend on the step only), and its result is checked each time, the error naming the step.
    ``at``, ``resolve_target`` and ``check`` take the ``step`` (default 0).
    """

    target: BudgetValue | None
    schedule: tuple[tuple[Point, BudgetValue], ...] = ()
    rounding: str = "round"
    per_step: Callable[[int], Any] | None = None

    def __post_init__(self):
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"budget rounding must be one of {list(ROUNDINGS)}, got {self.rounding!r}")

    @staticmethod
    def parse(budget, rounding: str = "round", step: int | None = None) -> Budget:
        """A :class:`Budget` from an int, a float, a schedule dict, a function of the step or a
        Budget (whose ``rounding`` is replaced by ``rounding``). With ``step``, a function of the
        step is called and its result parsed: the budget at that step."""
        if isinstance(budget, Budget):
            budget = dataclasses.replace(budget, rounding=rounding)
            return budget if step is None or budget.per_step is None else budget._at_step(step, lambda b: b)
        if callable(budget):
            budget = Budget(None, rounding=rounding, per_step=budget)
            return budget if step is None else budget._at_step(step, lambda b: b)
        if isinstance(budget, Mapping):
            if not budget:
                raise ValueError("budget schedule must not be empty")
            target = budget.get("target")
            points = []
            for key, value in budget.items():
                if key == "target":
                    continue
                points.append((_parse_point(key), value))
            return Budget(target, tuple(points), rounding)
        if budget is None:
            raise ValueError("budget is required: an int (tokens per image), a float in (0, 1] or a schedule dict")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise TypeError(
                f"budget must be an int (tokens per image), a float in (0, 1] or a dict schedule, got {budget!r}"
            )
        return Budget(budget, rounding=rounding)

    def _at_step(self, step: int, use: Callable[[Budget], Any]) -> Any:
        """``use`` applied to the budget that ``per_step`` gives at ``step``; any refusal of that
        value names the parameter, the step and the value."""
        value = self.per_step(step)
        try:
            if isinstance(value, Budget) or callable(value):
                raise TypeError("a function of the step must return an int, a float or a schedule dict")
            return use(Budget.parse(value, self.rounding))
        except (TypeError, ValueError) as e:
            raise type(e)(f"parameter 'budget' (a function of the step) returned {value!r} at step {step}: {e}") from None

    def resolve_target(self, n: int, step: int = 0) -> int:
        """Tokens per image of ``n`` to keep by the method's last point, at forward ``step``."""
        if self.per_step is not None:
            return self._at_step(step, lambda b: b.resolve_target(n))
        if self.target is not None:
            return _resolve_value(self.target, n, "", self.rounding)
        value = self.schedule[-1][1] if self.schedule else None
        return _resolve_value(value, n, f"[{self.schedule[-1][0]}]", self.rounding)

    def at(self, point: Point, n: int, step: int = 0) -> int | None:
        """The scheduled budget at ``point`` (matching ``stage:layer`` first, then the stage) at
        forward ``step``; None: no schedule entry there."""
        if self.per_step is not None:
            return self._at_step(step, lambda b: b.at(point, n))
        for p, value in self.schedule:
            if p == point:
                return _resolve_value(value, n, f"[{p}]", self.rounding)
        for p, value in self.schedule:
            if p.layer is None and p.stage == point.stage:
                return _resolve_value(value, n, f"[{p}]", self.rounding)
        return None

    def points(self) -> tuple[Point, ...]:
        return tuple(p for p, _ in self.schedule)

    def check(self, points, method: str, n: int | None = None, of: str = "the model has", step: int = 0) -> None:
        """Refuse, before anything runs, a schedule key that matches none of the method's
        ``points`` and any value that no image could take: ints must be in ``[1, n]`` (``n``
        None: at least 1; ``of`` says where ``n`` comes from), fractions in (0, 1]; a function
        of the step is checked on what it returns at ``step``."""
        if self.per_step is not None:
            return self._at_step(step, lambda b: b.check(points, method, n, of))
        names = [str(p) for p in points]
        stages = list(dict.fromkeys(q.stage for q in points))
        for p in self.points():
            if p.stage not in stages:
                raise ValueError(
                    f"budget schedule key {str(p)!r}: stage must be one of the stages method {method!r} prunes at "
                    f"{stages}; its points are {names}"
                )
            if p not in points and p.layer is not None:
                raise ValueError(
                    f"budget schedule key {str(p)!r}: method {method!r} does not prune there; its points are {names}"
                )
        if self.target is None and not self.schedule:
            raise ValueError("budget is required: an int (tokens per image), a float in (0, 1] or a schedule dict")
        if self.target is not None:
            _check_value(self.target, "", n, of)
        for p, value in self.schedule:
            _check_value(value, f"[{p}]", n, of)


def _parse_point(key) -> Point:
    if isinstance(key, Point):
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return Point("llm", key)
    if isinstance(key, str):
        stage, _, layer = key.partition(":")
        if not stage:
            raise ValueError(f"budget schedule key {key!r}: a stage name is required (e.g. 'projector', 'vit:3')")
        return Point(stage, int(layer) if layer else None)
    raise TypeError(f"budget schedule key must be a stage name, 'stage:layer' or an int LLM layer, got {key!r}")


def equal_split(budget: int, sizes) -> list[int]:
    """Share ``budget`` equally over parts of ``sizes`` tokens: ``int(budget / parts)`` each (the
    rule of HiPrune's LLaVA-NeXT code; the remainder is dropped), except that a part with fewer
    tokens than its share keeps all of them and the others share what is left the same way; so
    a budget of every token keeps every token."""
    capped: set[int] = set()
    while True:
        rest = [i for i in range(len(sizes)) if i not in capped]
        level = (budget - sum(sizes[i] for i in capped)) // len(rest) if rest else 0
        short = [i for i in rest if sizes[i] < level]
        if not short:
            return [sizes[i] if i in capped else level for i in range(len(sizes))]
        capped.update(short)


def progressive_count(ratios, stage: int, target: int, current: int) -> int:
    """Tokens a progressive method keeps at its pruning point ``stage`` when its official
    schedule keeps ``int(N0 * ratios[t])`` of the original ``N0`` after point ``t``
    (TransPrune, PyramidDrop-style AdaToken-3D) and the budget fixes the last point's count:
    the schedule rescaled so its last ratio gives ``target``, ``int(ratios[t] * target /
    ratios[-1])``, within ``[target, current]``. At ``target = ratios[-1] * N0`` this is the
    official schedule; at ``target = N0`` every point keeps everything."""
    if stage == len(ratios) - 1:
        return min(target, current)
    return min(current, max(target, int(ratios[stage] * target / ratios[-1] + 1e-9)))


def progressive_count_at(ctx, ratios, layers) -> int:
    """:func:`progressive_count` for the point ``ctx.layer`` of a method pruning before
    ``layers`` (a user schedule for that point wins: ``ctx.budget`` then differs from the target)."""
    if ctx.budget != ctx.target:
        return ctx.budget
    return progressive_count(ratios, list(layers).index(ctx.layer), ctx.target, ctx.n)
