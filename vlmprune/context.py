"""The objects methods and adapters meet through: pruning points, contexts, selections."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

#: the stage names of the vision-language adapters, the examples :class:`Point` names in its
#: error; other families name their own stages (:class:`StageSpec`)
STAGES = ("encoder", "projector", "llm", "cache")
ROLES = ("boundary", "inside", "output")


@dataclass(frozen=True)
class Point:
    """Where a method acts: a stage the adapter offers (:attr:`ModelInfo.stages`) and, for
    stages between blocks, a layer index.

    On VLMs ``encoder`` layer ``l`` means *before* vision-encoder layer ``l`` runs (so the
    signals of layer ``l - 1`` are available); ``llm`` layer ``K`` means before decoder
    layer ``K`` in prefill (signals of layer ``K - 1`` available);
    ``projector`` means on the vision features the projector is about to map.
    The stage name is checked against the model's stages by :meth:`Method.check`.
    """

    stage: str
    layer: int | None = None

    def __post_init__(self):
        if not isinstance(self.stage, str) or not self.stage:
            raise ValueError(f"stage must be a non-empty stage name (e.g. one of {STAGES}), got {self.stage!r}")

    def __str__(self) -> str:
        return self.stage if self.layer is None else f"{self.stage}:{self.layer}"


@dataclass(frozen=True)
class StageSpec:
    """What an adapter's stage allows, so the core never tests a stage's name.

    ``role``: ``"boundary"`` (between two modules, e.g. a VLM's projector), ``"inside"``
    (between blocks) or ``"output"``. ``layers``: valid ``Point.layer`` values (None: the adapter
    checks them). ``signals``: the signals offered there (empty: not declared, the model-wide
    :attr:`ModelInfo.signals` applies). ``prefix``: tokens outside ``ctx.tokens`` that are never
    pruned (a CLS token). ``ordered``: keep must ascend and merges stay in place. ``ragged``: rows
    may keep different counts (per-image keep lists). ``extra``: a selection may append tokens and
    keep the prefix (``Selection.extra``, ``keep_cls``). ``spaces``: the ``Selection.merged_space``
    values accepted. ``restore``: where removed tokens come back (``"exit"``, ``"head"``), or None.
    ``cls``: whether the prefix starts with a CLS token (None: whenever ``prefix > 0``; False for
    a prefix of registers only, timm's ``class_token=False``), read by :meth:`Method.check`.
    """

    name: str
    role: str
    layers: range | None = None
    signals: frozenset[str] = frozenset()
    prefix: int = 0
    ordered: bool = False
    ragged: bool = False
    extra: bool = False
    spaces: tuple[str, ...] = ("tokens",)
    restore: str | None = None
    cls: bool | None = None

    @property
    def has_cls(self) -> bool:
        """Whether the first prefix token is a CLS token (``cls``; None: whenever there is a prefix)."""
        return self.prefix > 0 if self.cls is None else self.cls

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"StageSpec {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if self.restore not in (None, "exit", "head"):
            raise ValueError(f"StageSpec {self.name!r}: restore must be one of [None, 'exit', 'head'], got {self.restore!r}")
        if not self.spaces or "tokens" not in self.spaces:
            raise ValueError(f"StageSpec {self.name!r}: spaces must include 'tokens', got {self.spaces!r}")


def vlm_stages(names, has_cls: bool = False) -> dict[str, StageSpec]:
    """The stage specs of the vision-language adapters (LLaVA, LLaVA-NeXT, Qwen-VL): ``encoder``
    between vision blocks, ``projector`` at the boundary (per-image keep lists, appended tokens,
    CLS kept, merges in the projected space) and ``llm`` between decoder layers (per-image
    counts); ``has_cls``: the tower's CLS token is the prefix of the vision stages."""
    known = {
        "encoder": StageSpec("encoder", "inside", prefix=int(has_cls)),
        "projector": StageSpec(
            "projector", "boundary", prefix=int(has_cls), ragged=True, extra=True, spaces=("tokens", "projected")
        ),
        "llm": StageSpec("llm", "inside", ragged=True),
        "cache": StageSpec("cache", "inside", ragged=True),
    }
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown VLM stage(s) {unknown}; valid choices: {list(known)}")
    return {n: known[n] for n in names}


@dataclass
class ModelInfo:
    """What an adapter tells a method about the model before anything runs, for any family.

    ``stages``: name -> :class:`StageSpec` (``"llm" in info.stages`` reads as before).
    ``default_points``: the point each role maps to on this model (VLMs: ``boundary`` ->
    ``Point("projector")``), for methods that name a role rather than a stage. ``grid``: rows,
    cols of the patch grid (None: per input); ``n_tokens``: tokens per input at the first stage
    (None: per input); ``signals``: signal names the adapter can provide (empty: all).

    Called the old way, with the VLM facts positionally or by keyword
    (``ModelInfo(family, n_visual, grid, has_cls, ...)``), it builds a :class:`VLMInfo`.
    """

    family: str
    stages: dict[str, StageSpec] = field(default_factory=dict)
    default_points: dict[str, Point] = field(default_factory=dict)
    grid: tuple[int, int] | None = None
    n_tokens: int | None = None
    signals: tuple[str, ...] = ()

    def __new__(cls, *args, **kwargs):
        if cls is ModelInfo and (
            (len(args) > 1 and not isinstance(args[1], dict)) or any(k in VLM_FIELDS for k in kwargs)
        ):
            return super().__new__(VLMInfo)  # __init__ then runs as VLMInfo's
        return super().__new__(cls)

    def spec(self, stage: str) -> StageSpec | None:
        """The spec of ``stage``, or None if this model has no such stage."""
        return self.stages.get(stage)


#: the VLM facts that make ``ModelInfo(...)`` build a :class:`VLMInfo`
VLM_FIELDS = ("n_visual", "has_cls", "encoder_layers", "feature_layer", "llm_layers", "patches_per_token")


class VLMInfo(ModelInfo):
    """A vision-language model's info: :class:`ModelInfo` plus the VLM facts methods read.

    ``n_visual``: visual tokens per image reaching the projector (patches, CLS excluded; also
    ``n_tokens``); ``has_cls``: the tower has a CLS token; ``encoder_layers``, ``feature_layer``
    (the encoder layer whose output feeds the projector), ``llm_layers``; ``patches_per_token``:
    vision-encoder patches per visual token (Qwen-VL's 2x2 merge groups: 4; encoder-stage
    ``encoder_qkv`` rows are patches, this many consecutive rows per token). ``stages`` may be
    given as names (the VLM specs of :func:`vlm_stages`); ``default_points`` defaults to
    ``boundary`` -> ``Point("projector")`` when the model has a projector stage.
    """

    def __init__(
        self,
        family: str,
        n_visual: int | None,
        grid: tuple[int, int] | None,
        has_cls: bool,
        encoder_layers: int,
        feature_layer: int,
        llm_layers: int,
        stages=(),
        signals: tuple[str, ...] = (),
        patches_per_token: int = 1,
        default_points: dict[str, Point] | None = None,
    ):
        if not isinstance(stages, dict):
            stages = vlm_stages(stages, has_cls)
        if default_points is None:
            default_points = {"boundary": Point("projector")} if "projector" in stages else {}
        super().__init__(family, stages, default_points, grid, n_visual, signals)
        self.n_visual = n_visual
        self.has_cls = has_cls
        self.encoder_layers = encoder_layers
        self.feature_layer = feature_layer
        self.llm_layers = llm_layers
        self.patches_per_token = patches_per_token

    def __repr__(self) -> str:
        facts = ", ".join(f"{k}={getattr(self, k)!r}" for k in VLM_FIELDS)
        return f"VLMInfo(family={self.family!r}, {facts}, stages={list(self.stages)}, signals={self.signals!r})"

    def __eq__(self, other) -> bool:
        return ModelInfo.__eq__(self, other) and all(getattr(self, k) == getattr(other, k) for k in VLM_FIELDS)


@dataclass
class Selection:
    """What a method returns.

    ``keep``: ``[B, k]`` indices into ``ctx.tokens`` (sorted ascending unless the
    method documents otherwise); at the projector and llm stages also a list of 1-D tensors,
    one per image, for methods whose count adapts per image. ``merged``: optional
    replacement values for the kept tokens, shaped like ``keep`` plus ``C`` (recovery
    methods). ``extra``: optional ``[B, E, C]`` tokens with no single origin appended
    after the kept ones (PruMerge's summary token); projector stage only.
    ``keep_cls``: also pass the tower's CLS token to the LLM, first (VisionZip).
    ``scores``: optional ``[B, N]`` for heatmaps and tests. ``merge_map``: optional
    ``[B, N]``, the position in ``keep`` each token was merged into (-1: dropped).
    ``merged_space``: ``"tokens"`` (``merged`` lives where ``ctx.tokens`` do) or, at the
    projector stage, ``"projected"``: ``merged`` holds LLM-space values (like signal
    ``projected``) that replace the kept tokens' projections (VFlowOpt recycles projected
    features). ``exit_outputs``: optional ``[B, N, D]`` (or one ``[N, D]`` per image) aligned
    with ``ctx.tokens``: for each token the selection removes, the value the model's dense head
    gives it instead of its own output (DToP's early-exit predictions); only at stages whose spec
    has ``restore="head"``; rows of kept tokens are ignored.
    """

    keep: torch.Tensor | list[torch.Tensor]
    merged: torch.Tensor | list[torch.Tensor] | None = None
    extra: torch.Tensor | list[torch.Tensor] | None = None
    keep_cls: bool = False
    scores: torch.Tensor | None = None
    merge_map: torch.Tensor | None = None
    merged_space: str = "tokens"
    exit_outputs: torch.Tensor | list[torch.Tensor] | None = None

    def per_image(self) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """``(keep_i, merged_i, extra_i)`` for each image, whatever the batch layout."""
        n = len(self.keep)
        merged = self.merged if self.merged is not None else [None] * n
        extra = self.extra if self.extra is not None else [None] * n
        return [(self.keep[i], merged[i], extra[i]) for i in range(n)]

    def counts(self) -> list[int]:
        extra = [0] * len(self.keep) if self.extra is None else [e.shape[0] for e in self.extra]
        return [k.shape[0] + e + int(self.keep_cls) for k, e in zip(self.keep, extra)]


@dataclass
class SelectionRecord:
    """One call of a method's ``select`` (``Handle.record()``): the point, the raster indices of
    the tokens alive there (``[B, N]``, -1 for a token with no single origin), the
    :class:`Selection` returned, the patch grid of the call and the image of each row
    (``ctx.images``)."""

    point: Point
    token_index: torch.Tensor
    selection: Selection
    grid: tuple[int, int] | None = None
    images: tuple[int, ...] = ()


class Signals:
    """Lazy accessors for what a method may read; each value is computed once per call.

    An adapter subclasses this for a stage. Every accessor returns tensors aligned
    with ``ctx.tokens`` (``[B, N]`` or ``[B, N, C]``). Asking for a signal that the
    method did not declare in ``needs``, or that the model cannot give, raises.
    """

    def __init__(self, providers: dict[str, Callable[..., Any]]):
        self._providers = providers
        self._cache: dict[tuple, Any] = {}

    def available(self) -> tuple[str, ...]:
        return tuple(self._providers)

    def get(self, name: str, **kwargs) -> Any:
        if name not in self._providers:
            raise KeyError(
                f"signal {name!r} is not available at this stage; available: {sorted(self._providers)}"
            )
        key = (name, tuple(sorted(kwargs.items())))
        if key not in self._cache:
            self._cache[key] = self._providers[name](**kwargs)
        return self._cache[key]

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda **kwargs: self.get(name, **kwargs)


@dataclass
class Session:
    """What outlives one forward of a wrapped model until ``handle.reset()``: ``state``
    (``ctx.state.session``: a VLA episode's memory, a sampling run's) and ``steps``, the forwards
    run so far (the next forward's ``ctx.step``)."""

    state: dict = field(default_factory=dict)
    steps: int = 0

    def reset(self) -> None:
        self.state = {}
        self.steps = 0


class State(MutableMapping):
    """``ctx.state``: a method's memory in three scopes.

    ``forward``: one dict shared by every call of one forward (prefill) for one group of images
    (FlowCut's running score); indexing ``ctx.state`` reads and writes it, so ``ctx.state`` works
    as that dict. ``images``: one dict per row of the call, the same object for that image at
    every point of the forward and for every part of it (``ImagePart.state``; also
    ``ctx.image_state``). ``session``: one dict that survives forwards until ``handle.reset()``
    (an episode of control steps, a sampling run). The forward and images scopes are new at every
    forward.
    """

    def __init__(self, forward: dict | None = None, images: list[dict] | None = None, session: dict | None = None):
        self.forward = {} if forward is None else forward
        self.images = [] if images is None else images
        self.session = {} if session is None else session

    def __getitem__(self, key):
        return self.forward[key]

    def __setitem__(self, key, value) -> None:
        self.forward[key] = value

    def __delitem__(self, key) -> None:
        del self.forward[key]

    def __iter__(self) -> Iterator:
        return iter(self.forward)

    def __len__(self) -> int:
        return len(self.forward)

    def __repr__(self) -> str:
        return f"State(forward={self.forward!r}, images={self.images!r}, session={self.session!r})"


@dataclass
class ImagePart:
    """Where one row of a call sits in its whole image, for adapters that call a stage on *parts*
    of an image (LLaVA-NeXT's projector stage: one row per crop, i.e. the base image or a tile)
    while a later stage sees the whole image at once.

    ``state``: the whole image's dict of the images scope (:attr:`State.images`), the very object
    the later stages' ``ctx.state.images`` hold for that image (shared by all parts of the image
    in this forward). ``index`` ``[N]``:
    each token of the row in the whole image's numbering (the later stages' ``token_index``).
    ``grid``: the whole image's grid in that numbering. ``n``, ``budget``, ``target``: the whole
    image's visual-token count and its budget/target at this point (``ctx.budget``/``ctx.target``
    are the row's share). ``part``: the part's index in the image (0: the first, e.g. the base
    image); ``sizes``: the tokens each part of the image offers at this stage (``len(sizes)``
    parts). ``layout_index`` ``[N]`` / ``layout_grid``: each token's raster index in the 2-D grid
    of the region the part belongs to as the model lays it out (LLaVA-NeXT: the base image's own
    grid for crop 0; the joined, un-padded tile grid for tiles), for methods that group tokens
    spatially across parts.
    """

    state: dict
    index: torch.Tensor
    grid: tuple[int, int]
    n: int
    budget: int
    target: int
    part: int = 0
    layout_index: torch.Tensor | None = None
    layout_grid: tuple[int, int] | None = None
    sizes: tuple[int, ...] = ()


@dataclass
class TokenContext:
    """The visual tokens alive at one pruning point, for a batch of images.

    ``tokens`` ``[B, N, C]`` (CLS excluded; ``cls_token`` ``[B, C]`` if the tower has
    one); ``token_index`` ``[B, N]``: each token's raster index in the original
    ``grid`` (rows, cols); ``budget``: tokens to keep per image at this call;
    ``target``: tokens per image the method must reach by its last point;
    ``state``: the method's memory in three scopes (:class:`State`); indexed like a dict it is the
    forward scope, shared by all calls of one forward for this group of images (a plain dict given
    here becomes that scope). ``step``: forwards this session ran before this one
    (:class:`Session`; 0 at the first forward after ``wrap()`` or ``handle.reset()``).
    ``images``: the index of each row's image among the images of this forward (rows of an
    ``llm``-stage call may be a subset, grouped by token count). ``image_state``: the images scope,
    ``state.images`` under its older name (one dict per row, the same object for that image at
    every point of the forward: VFlowOpt's importance map); a list given here becomes that scope.
    ``parts``: empty when every row is a whole image; else one :class:`ImagePart` per row, for
    adapters that call this stage per part of an image (LLaVA-NeXT's projector stage, per crop).
    Use :meth:`whole_images` to read both cases alike.
    """

    tokens: torch.Tensor
    stage: str
    layer: int | None
    budget: int
    target: int
    grid: tuple[int, int]
    token_index: torch.Tensor
    signals: Signals
    state: State | dict = field(default_factory=dict)
    cls_token: torch.Tensor | None = None
    info: ModelInfo | None = None
    generator: torch.Generator | None = None
    images: tuple[int, ...] = ()
    image_state: list[dict] = field(default_factory=list)
    parts: list[ImagePart] = field(default_factory=list)
    step: int = 0

    def __post_init__(self):
        if not isinstance(self.state, State):
            self.state = State(forward=self.state, images=self.image_state)
        elif self.image_state and self.image_state is not self.state.images:
            raise ValueError("TokenContext: image_state is state.images under another name; give one of them")
        if not self.state.images:
            self.state.images.extend({} for _ in range(self.tokens.shape[0]))
        self.image_state = self.state.images

    def whole_images(self) -> list[ImagePart]:
        """Per row, the row's place in its whole image: ``parts`` when the adapter set them, else
        the row itself as a whole image (``state.images``, ``token_index``, ``grid``, ``n``,
        ``budget``, ``target``)."""
        if self.parts:
            return list(self.parts)
        states = self.state.images
        return [
            ImagePart(state=states[j], index=self.token_index[j], grid=self.grid, n=self.n, budget=self.budget,
                      target=self.target, part=0, layout_index=self.token_index[j], layout_grid=self.grid, sizes=(self.n,))
            for j in range(self.tokens.shape[0])
        ]

    @property
    def n(self) -> int:
        return self.tokens.shape[1]

    @property
    def point(self) -> Point:
        return Point(self.stage, self.layer)
