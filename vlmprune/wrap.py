"""``wrap()``: patch a model in place so that it prunes visual tokens; the handle undoes it."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import threading
from typing import Any, Iterator

from torch import nn

from .budget import Budget
from .context import SelectionRecord
from .method import Method
from .registry import get_method
from .stats import Stats

_HANDLE_ATTR = "_vlmprune_handle"


class Handle:
    """What :func:`wrap` returns: ``stats``, ``record()``, ``reset()``, ``unwrap()``, and a context
    manager.

    A wrap is one session: ``ctx.state.session`` (a dict methods keep across forwards) and
    ``ctx.step`` (forwards run before the current one; one prefill with images counts once, however
    many tokens ``generate()`` then adds, with or without a cache) last until ``reset()``, e.g.
    between the episodes of a policy or two sampling runs; a budget may be a function of the step.
    ``Handle.of(model)`` finds a wrapped model's handle: the way to reach the handle of a
    ``copy.deepcopy`` of a wrapped model, which is wrapped again on its own (same method options,
    budget and wrap options; its own stats and a new session; unwrapping one leaves the other
    wrapped).
    """

    def __init__(self, model: nn.Module, adapter, installed, plan):
        self.model = model
        self.method: Method = plan.method
        self.budget: Budget = plan.budget
        self.adapter = adapter
        self._installed = installed
        self._stats: Stats = plan.stats
        self._plan = plan
        #: held for the whole of every call of the wrapped model (concurrent calls run one by one)
        self._lock = _CallLock()
        self.active = True

    @staticmethod
    def of(model: nn.Module) -> "Handle | None":
        """The handle of the wrap active on ``model``, None if it is not wrapped."""
        return vars(model).get(_HANDLE_ATTR)

    @contextlib.contextmanager
    def record(self) -> Iterator[list[SelectionRecord]]:
        """Record what the method chooses while the block runs: yields a list that receives a
        :class:`~vlmprune.context.SelectionRecord` (point, raster indices of the tokens alive,
        Selection, grid, images) for every ``select`` call, in call order::

            with handle.record() as records:
                model.generate(**inputs)
            kept = records[-1].token_index[0, records[-1].selection.keep[0]]
        """
        records: list[SelectionRecord] = []
        self._plan.recorders.append(records)
        try:
            yield records
        finally:
            self._plan.recorders[:] = [r for r in self._plan.recorders if r is not records]

    @property
    def stats(self) -> dict[str, Any]:
        """Tokens in/out per pruning point and image at the last prefill, time in ``select``, and
        the adapter's cost figures (:meth:`~vlmprune.adapters.Adapter.cost`; the VLM adapters: LLM
        prefill FLOPs and KV-cache bytes with and without pruning, estimates from the config)."""
        return self._stats.as_dict()

    def reset(self) -> None:
        """Start a new session: clear ``ctx.state.session``; the next forward has ``ctx.step`` 0.
        Waits for calls in flight in other threads to finish."""
        with self._lock:
            self._plan.session.reset()

    def unwrap(self) -> nn.Module:
        """Remove every hook and attribute this wrap added; the model is exactly as before.
        Waits for calls in flight in other threads to finish."""
        with self._lock:
            if self.active:
                self._installed.remove()
                self.active = False
        return self.model

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.unwrap()

    def __repr__(self) -> str:
        state = "active" if self.active else "unwrapped"
        return f"Handle(method={self.method.name!r}, budget={self.budget}, {state})"


def wrap(model: nn.Module, method: str | Method = "fastv", budget=None, weights=None, **options) -> Handle:
    """Make ``model`` prune its visual tokens with ``method`` at ``budget``.

    ``budget``: an int (visual tokens kept per image), a float in (0, 1] (fraction kept)
    or a schedule dict (see :class:`vlmprune.budget.Budget`) whose keys must name points the
    method acts at, or a function ``step ->`` one of those (``ctx.step``, see :class:`Handle`;
    its value at step 0 is checked here, each step's again when that forward runs); left out
    for a method whose options set its amount (``uses_budget`` False: ToMe's ``r``).
    Checked here on every tower: type, sign, NaN/inf, fraction range, and ints
    against the tokens per image; where the count comes from ``pixel_values``, against the most
    the config allows (a DINOv2 tower: ``(image_size / patch_size)**2`` of the vision config,
    the count a LLaVA processor at that size puts in the prompt; LLaVA-NeXT: the base crop plus
    the largest ``image_grid_pinpoints`` tiles; Qwen-VL: no bound, its image size is the
    processor's), and each image's own count again at the first forward. ``weights``: trained module
    weights for the methods that have some (``vlmprune.methods()`` lists them with
    ``accepts_weights``): a path written by the method's training command, or an object the
    method documents; without it such a method loads its shipped default (if any) for this
    model. ``options`` go to the method (its options: ``vlmprune.methods()`` lists them with
    defaults) or to the model's adapter (``Adapter.options``: the LLaVA and Qwen-VL adapters take
    ``positions``, how the tokens a method removes *before* the LLM leave the others numbered,
    ``"compact"`` or ``"original"``, and ``llm_positions``, the same inside the LLM; None: the
    method's choice; Qwen-VL offers ``"original"`` only, its 3-D positions are never renumbered);
    a name both take is refused. The model is patched in place; ``handle.unwrap()`` (or leaving a ``with``
    block) restores it. Calls from several threads run one at a time (a per-model lock held
    for the whole ``model(...)``, ``forward`` or ``generate`` call); ``copy.deepcopy(model)``
    gives a copy wrapped on its own (see :class:`Handle`).
    """
    from .adapters import Plan, find_adapter
    from .adapters.base import adapter_class

    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise RuntimeError("this model is already wrapped by vlmprune; call handle.unwrap() first")
    method_options, adapter_options = _route(method, adapter_class(model), options)
    instance = _instantiate(method, method_options)
    if weights is not None:
        if not instance.accepts_weights:
            from .registry import methods as _methods

            takers = [m["name"] for m in _methods() if m["accepts_weights"]]
            raise TypeError(
                f"parameter 'weights' is for methods with trained modules ({takers}); "
                f"method {instance.name!r} takes no weights"
            )
        instance.load_weights(weights)
    elif instance.accepts_weights:
        instance.resolve_weights(model)
    adapter = find_adapter(model)
    adapter.given = adapter_options
    info = adapter.info()
    instance.check(info)
    if not instance.uses_budget:
        if budget is not None:
            raise TypeError(
                f"parameter 'budget' does not apply to method {instance.name!r}: its options "
                f"({', '.join(instance.options())}) set how many tokens it removes; leave budget out"
            )
        budget = 1.0
    parsed = Budget.parse(budget, rounding=instance.fraction_rounding)
    points = instance.points(info)
    if info.n_tokens is not None:
        parsed.check(points, instance.name, info.n_tokens)
    else:
        parsed.check(points, instance.name, adapter.max_visual(), "the model's config allows at most")
    adapter_options = adapter.check_options(adapter_options, instance, points)
    adapter.check_plan(instance, points)
    stats = Stats(cost=adapter.cost)
    plan = Plan(method=instance, budget=parsed, points=points, capture=instance.capture_layers(info), stats=stats,
                adapter_options=adapter_options)
    return _install(model, adapter, plan)


def _install(model: nn.Module, adapter, plan) -> Handle:
    installed = adapter.install(plan)
    handle = Handle(model, adapter, installed, plan)
    installed.set_attribute(model, _HANDLE_ATTR, handle)
    _serialise_calls(model, installed, handle._lock, adapter.calls)
    installed.set_attribute(model, "__deepcopy__", functools.partial(_deepcopy_wrapped, handle))
    return handle


def _deepcopy_wrapped(handle: Handle, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a wrapped model: the model copied as if unwrapped, then wrapped
    again with a copy of the method and the same budget and options (fresh stats)."""
    from .adapters import Plan, find_adapter

    with handle._lock:
        new = handle._installed.copy_without(handle.model, memo)
        plan = handle._plan
        adapter = find_adapter(new)
        _install(new, adapter, Plan(
            method=copy.deepcopy(plan.method, memo), budget=plan.budget, points=list(plan.points),
            capture=dict(plan.capture), stats=Stats(cost=adapter.cost), adapter_options=dict(plan.adapter_options),
        ))
    return new


def _serialise_calls(model: nn.Module, installed, lock: _CallLock, calls: tuple[str, ...]) -> None:
    """One call at a time: ``model(...)`` (its hooks included) and the model's methods named in
    ``calls`` (the adapter's :attr:`~adapters.base.Adapter.calls`: ``forward``, ``generate``, PI0's
    ``sample_actions``) hold the wrap's re-entrant lock for the whole call, because the runtime
    keeps the state of the prefill it is pruning (a second thread would otherwise read it)."""
    installed.hook(model.register_forward_pre_hook(lock.enter_hook, prepend=True))
    installed.hook(model.register_forward_hook(lock.exit_hook, always_call=True))
    for name in calls:
        inner = getattr(model, name, None)
        if inner is not None:
            installed.set_attribute(model, name, lock.guard(inner))


class _CallLock:
    """A re-entrant lock taken by a forward pre-hook and released by a forward hook (run even
    when the forward raises), or held around a function by :meth:`guard`."""

    def __init__(self):
        self._lock = threading.RLock()
        self._held = threading.local()  # hook acquisitions of this thread not yet released

    def enter_hook(self, module, args):
        self._lock.acquire()
        self._held.count = getattr(self._held, "count", 0) + 1

    def exit_hook(self, module, args, output):
        if getattr(self._held, "count", 0):  # a global pre-hook may have raised before enter_hook
            self._held.count -= 1
            self._lock.release()

    def __enter__(self):
        self._lock.acquire()

    def __exit__(self, *exc):
        self._lock.release()

    def guard(self, fn):
        @functools.wraps(fn)
        def serialised(*args, **kwargs):
            with self._lock:
                return fn(*args, **kwargs)

        return serialised


def _route(method: str | Method, adapter_cls, options: dict) -> tuple[dict, dict]:
    """Split ``wrap()``'s keyword arguments into the method's options and the adapter's
    (``adapter_cls.options``; None: no adapter serves the model, refused later): a name both
    take is refused, as is a name neither takes (naming both lists)."""
    cls = type(method) if isinstance(method, Method) else get_method(method)
    valid = [f.name for f in dataclasses.fields(cls)]
    offered = list(adapter_cls.options) if adapter_cls is not None else []
    where = f"the {adapter_cls.__name__} adapter's options: {offered}" if adapter_cls is not None else "no adapter"
    both = sorted(set(options) & set(valid) & set(offered))
    if both and not isinstance(method, Method):
        raise TypeError(
            f"option(s) {both} are both options of method {cls.name!r} and of the {adapter_cls.__name__} adapter; "
            f"set the method's on an instance (wrap(model, vlmprune.get_method({cls.name!r})(...), ...)) and pass "
            "the adapter's to wrap()"
        )
    adapter_options = {k: v for k, v in options.items() if k in offered}
    method_options = {k: v for k, v in options.items() if k not in offered}
    unknown = sorted(set(method_options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for method {cls.name!r}; valid options: {valid}; {where}")
    return method_options, adapter_options


def _instantiate(method: str | Method, options: dict) -> Method:
    if isinstance(method, Method):
        if options:
            raise TypeError("pass options either to the Method instance or to wrap(), not both")
        return method
    return get_method(method)(**options)
