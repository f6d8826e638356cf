"""The adapter interface and the bookkeeping that lets ``unwrap()`` undo every change."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vlmprune.budget import Budget
from vlmprune.context import ModelInfo, Point, Session
from vlmprune.method import Method
from vlmprune.stats import LLMShape, Stats

ADAPTERS: list[type["Adapter"]] = []


def register_adapter(cls: type["Adapter"]) -> type["Adapter"]:
    ADAPTERS.append(cls)
    return cls


def adapter_class(model: nn.Module) -> "type[Adapter] | None":
    """The registered adapter class that serves ``model`` (None: none does)."""
    return next((cls for cls in ADAPTERS if cls.matches(model)), None)


def find_adapter(model: nn.Module) -> "Adapter":
    cls = adapter_class(model)
    if cls is not None:
        return cls(model)
    known = sorted({fam for cls in ADAPTERS for fam in cls.model_types})
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ValueError(
        f"no adapter knows this model ({type(model).__name__}, model_type={model_type!r}); "
        f"supported model types: {known}"
    )


@dataclass
class Plan:
    """What ``wrap()`` asks an adapter to install: a method, its budget and where it acts."""

    method: Method
    budget: Budget
    points: list[Point]
    capture: dict[str, tuple[int, ...]]
    stats: "Any"
    #: the adapter's options (:attr:`Adapter.options`) as ``wrap()`` got them, every declared
    #: name present (None: not given)
    adapter_options: dict[str, Any] = field(default_factory=dict)
    #: lists that ``Handle.record()`` is filling: every ``select`` call is appended to each
    recorders: list = field(default_factory=list)
    #: what outlives a forward until ``handle.reset()`` (``ctx.state.session``, ``ctx.step``)
    session: Session = field(default_factory=Session)


class Installed:
    """Records every change an adapter makes (hooks, attributes) so it can be undone exactly."""

    def __init__(self):
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._attributes: list[tuple[object, str, bool, Any]] = []

    def hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._handles.append(handle)

    def set_attribute(self, obj: object, name: str, value: Any) -> None:
        had = name in vars(obj)
        self._attributes.append((obj, name, had, vars(obj).get(name)))
        setattr(obj, name, value)

    def copy_without(self, module: nn.Module, memo: dict) -> nn.Module:
        """A deep copy of ``module`` (for ``copy.deepcopy``'s ``memo``) as if these changes had
        been undone: the copy has none of the hooks and holds the attributes' values from before;
        ``module`` itself is left as it is (other threads may be using it)."""
        for handle in self._handles:
            hooks = handle.hooks_dict_ref()
            if hooks is not None and handle.id in hooks:
                memo[id(hooks[handle.id])] = None  # never copy a hook (it holds the wrap's runtime)
        first: dict[tuple[int, str], tuple] = {}
        for obj, name, had, old in self._attributes:
            first.setdefault((id(obj), name), (obj, name, had, old))
            if name in vars(obj):
                memo[id(vars(obj)[name])] = None
        new = type(module).__new__(type(module))
        memo[id(module)] = new
        new.__setstate__(copy.deepcopy(module.__getstate__(), memo))
        for handle in self._handles:
            for ref in (handle.hooks_dict_ref, *handle.extra_dict_ref):
                copied = memo.get(id(ref()))
                if copied is not None:
                    copied.pop(handle.id, None)
        for obj, name, had, old in first.values():
            copied = memo.get(id(obj))
            if copied is None:
                continue  # not reached from module
            if had:
                setattr(copied, name, copy.deepcopy(old, memo))
            elif name in vars(copied):
                delattr(copied, name)
        return new

    def remove(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        for obj, name, had, old in reversed(self._attributes):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)
        self._handles.clear()
        self._attributes.clear()


@dataclass(frozen=True)
class AdapterOption:
    """One keyword of ``wrap()`` that an adapter takes (an entry of :attr:`Adapter.options`).
    Its default is always None: the method's (or the adapter's) own choice."""

    #: the values the option may name
    choices: tuple[str, ...]
    doc: str
    #: the choices this adapter implements (None: all); another choice is refused naming these
    offered: tuple[str, ...] | None = None
    #: the stages whose points the option concerns: refused for a method with none there
    stages: tuple[str, ...] = ()
    #: the reason given then, formatted with ``method`` (the method's name)
    unused: str = ""

    @property
    def available(self) -> tuple[str, ...]:
        """The choices this adapter gives."""
        return self.choices if self.offered is None else self.offered


class Adapter:
    """Base class of model adapters.

    Subclasses set ``model_types`` (``config.model_type`` values they serve), return
    :class:`ModelInfo` from :meth:`info` and implement :meth:`install`; they may declare
    ``wrap()`` keywords of their own in :attr:`options` and report costs from :meth:`cost`.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    stages: ClassVar[tuple[str, ...]] = ()
    #: ``wrap()`` keywords this adapter takes besides the method's options (name -> declaration)
    options: ClassVar[dict[str, AdapterOption]] = {}
    #: the model's methods that run one whole call: ``wrap()`` holds its per-model lock through
    #: each (besides ``model(...)``), since the runtime keeps the state of the call it is pruning
    calls: ClassVar[tuple[str, ...]] = ("forward", "generate")
    #: the adapter options ``wrap()`` was given, set before it asks for :meth:`info` (for facts
    #: that depend on one: the ViT adapter's ``boundary_layer`` moves its boundary point)
    given: dict[str, Any] = {}

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in cls.model_types

    def info(self) -> ModelInfo:  # pragma: no cover - abstract
        raise NotImplementedError

    def install(self, plan: Plan) -> Installed:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_options(self, values: dict[str, Any], method: Method, points: list[Point]) -> dict[str, Any]:
        """Validate the adapter options ``wrap()`` got for ``method`` acting at ``points``:
        each value is one of its choices, concerns a stage the method acts at, and is one this
        adapter offers. Returns every declared option, None where not given."""
        out = {}
        for name, opt in self.options.items():
            value = values.get(name)
            if value is not None:
                if value not in opt.choices:
                    raise ValueError(f"parameter {name!r} must be one of {list(opt.choices)} or None, got {value!r}")
                if opt.stages and not any(p.stage in opt.stages for p in points):
                    raise ValueError(f"parameter {name!r} " + opt.unused.format(method=method.name))
                if value not in opt.available:
                    raise ValueError(
                        f"parameter {name!r}: the {self.info().family} adapter offers {list(opt.available)}, "
                        f"not {value!r}"
                    )
            out[name] = value
        return out

    def check_plan(self, method: Method, points: list[Point]) -> None:
        """Refuse, at ``wrap()``, what this model's mechanics cannot serve for ``method`` acting at
        ``points`` (after the core's checks): nothing by default; the VLM adapters require SDPA
        or eager attention for points inside the LLM."""

    def cost(self, stats: Stats) -> dict[str, Any]:
        """What the last forward cost, as this family counts it (merged into ``handle.stats``):
        nothing by default; the VLM adapters give LLM prefill FLOPs and KV-cache bytes."""
        return {}

    def max_visual(self) -> int | None:
        """The most visual tokens one image can bring, as far as the config fixes it, for
        ``wrap()`` to refuse larger int budgets early: ``info().n_visual`` by default; None where
        the count depends on each image and is checked at the first forward only."""
        return self.info().n_tokens


def read_arg(args: tuple, kwargs: dict, name: str, position: int | None = None, aliases: tuple[str, ...] = ()):
    """Read an argument of a hooked call by name (or old spelling, or position)."""
    for key in (name, *aliases):
        if key in kwargs:
            return kwargs[key]
    if position is not None and len(args) > position:
        return args[position]
    return None


def write_arg(args: tuple, kwargs: dict, name: str, value, position: int | None = None, aliases=()) -> tuple:
    """Replace an argument wherever the caller put it; returns the new ``(args, kwargs)``."""
    for key in (name, *aliases):
        if key in kwargs:
            kwargs[key] = value
            return args, kwargs
    if position is not None and len(args) > position:
        args = args[:position] + (value,) + args[position + 1 :]
        return args, kwargs
    kwargs[name] = value
    return args, kwargs


def new_generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device if device.type != "meta" else "cpu")
    gen.manual_seed(seed)
    return gen



def check_selection(sel, ctx, method: str) -> None:
    """Refuse a malformed selection with an error naming the method (never prune silently wrong).
    What the stage allows (per-image keep lists, appended tokens and CLS, merge spaces) is read
    from its :class:`~vlmprune.context.StageSpec` in ``ctx.info.stages``."""
    b, n = ctx.tokens.shape[:2]
    spec = ctx.info.stages[ctx.stage]
    if isinstance(sel.keep, (list, tuple)) and not spec.ragged:
        raise RuntimeError(f"method {method!r} returned per-image keep lists at stage {ctx.stage!r}; use a [B, k] tensor")
    if len(sel.keep) != b:
        raise RuntimeError(f"method {method!r} returned keep for {len(sel.keep)} images, expected {b}")
    if sel.merged_space not in spec.spaces:
        raise RuntimeError(
            f"method {method!r} returned merged_space={sel.merged_space!r} at stage {ctx.stage!r}, which accepts "
            f"{list(spec.spaces)}"
        )
    for i, (keep, merged, extra) in enumerate(sel.per_image()):
        if keep.dtype != torch.long or keep.dim() != 1:
            raise RuntimeError(f"method {method!r} returned keep of dtype {keep.dtype} / shape {tuple(keep.shape)}")
        if keep.numel() == 0 and ctx.stage == "llm":
            continue  # dropping every visual token inside the LLM is allowed (ToDRE's stage 2)
        if keep.numel() < 1 or keep.numel() > n or int(keep.min()) < 0 or int(keep.max()) >= n:
            raise RuntimeError(f"method {method!r} returned indices outside [0, {n}) or an empty/oversized keep set")
        if torch.unique(keep).numel() != keep.numel():
            raise RuntimeError(f"method {method!r} returned duplicate indices in keep")
        if spec.ordered and keep.numel() > 1 and not bool((keep[1:] > keep[:-1]).all()):
            raise RuntimeError(
                f"method {method!r} returned keep that does not ascend at stage {ctx.stage!r}, whose tokens stay in "
                "scan order (StageSpec.ordered): sort it"
            )
        if merged is not None and merged.shape[0] != keep.shape[0]:
            raise RuntimeError(f"method {method!r}: merged must have one row per kept token")
        if extra is not None and not spec.extra:
            raise RuntimeError(f"method {method!r} returned extra tokens at stage {ctx.stage!r}, where none can be added")
    if sel.exit_outputs is not None and spec.restore != "head":
        raise RuntimeError(
            f"method {method!r} returned exit_outputs at stage {ctx.stage!r}, where no dense head takes them "
            "(a stage with restore='head')"
        )
    if sel.keep_cls and not (spec.extra or spec.prefix):
        raise RuntimeError(
            f"method {method!r} asked to keep CLS at stage {ctx.stage!r}, which has no prefix token and adds none"
        )


def llm_cost(decoder, text_config, stats: Stats) -> dict[str, Any]:
    """:meth:`Adapter.cost` of a VLM: LLM prefill FLOPs and KV bytes of the last prefill."""
    return llm_shape(decoder, text_config).cost(stats)


def llm_shape(decoder, text_config) -> LLMShape:
    """The cost model's numbers for a decoder (see :class:`vlmprune.stats.LLMShape`)."""
    return LLMShape(
        layers=text_config.num_hidden_layers,
        hidden=text_config.hidden_size,
        intermediate=text_config.intermediate_size,
        heads=decoder.heads,
        kv_heads=decoder.kv_heads,
        head_dim=decoder.head_dim,
        bytes_per_value=next(decoder.model.parameters()).element_size(),
    )
