"""The method base class: a dataclass of the paper's options that only chooses tokens."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from .context import ModelInfo, Point, Selection, TokenContext

#: the role of each VLM stage, from which a method's ``roles`` default derives
VLM_STAGE_ROLES = {"encoder": "inside", "projector": "boundary", "llm": "inside", "cache": "inside"}

#: Signals a method may declare in ``needs``.
SIGNALS = frozenset(
    {
        "cls_attention",  # CLS -> patch attention of a vision-encoder layer
        "encoder_attention",  # full attention probabilities of a vision-encoder layer
        "encoder_qkv",  # per-head queries, keys and values of a vision-encoder layer
        "hidden",  # hidden states of the current tokens (vision or LLM space)
        "projected",  # the current tokens mapped by the projector (LLM space)
        "projector",  # the projector as a row-wise map, for perturbation methods
        "projector_input",  # what the projector maps to each current token (LLaVA: the tokens themselves)
        "text_attention",  # LLM attention rows (last / instruction tokens -> image tokens)
        "llm_qkv",  # per-head queries (post-RoPE), keys and values at an LLM layer
        "relay_qkv",  # per image: q/k/v at an LLM layer of the prompt's last token, then the image's tokens
        "instruction_states",  # per image: LLM keys of its tokens and of the text after it, that text's hidden states
        "llm_norm",  # the language model's final norm, as a callable
        "llm_input",  # per image: the prefill's LM input of its tokens and of the text after it
        "text_embedding",  # the LLM input embeddings of the prompt's text tokens
        "pixels",  # each current token's pixel patch, as fed to the vision tower
        "sublayer_io",  # inputs and outputs of an LLM layer's attention and MLP sub-layers (prefill)
        "sizes",  # how many original tokens each current token stands for after earlier merges (ToMe)
        "mixer_backward",  # a vision Mamba block's backward-branch gated SSM output (flipped order; ToP-ViM)
        "cls_position",  # each row's class-token index in the current sequence (a mid-sequence CLS: Vim)
        "action_history",  # VLA policies: per earlier control step of the episode, the action tokens' attention to each image token
        "received_attention",  # retrievers: attention each patch receives in the last decoder layer (mean over heads, positions)
    }
)


def option(default: Any, doc: str, choices: tuple | None = None):
    """A method option: its default, where the default comes from, and (for str) valid choices."""
    return dataclasses.field(default=default, metadata={"doc": doc, "choices": choices})


def scale_llm_layers(layers, reference: int, depth: int, where: str, spread: bool = False, model: str = "LLM") -> tuple[int, ...]:
    """Map LLM layer indices a paper gives for a ``reference``-layer language model onto one of
    ``depth`` layers: ``K -> floor(K * depth / reference + 0.5)`` (``reference=0``: used as
    given). The result must be strictly increasing in ``[1, depth - 1]`` (a pruning point sits
    before a decoder layer and after at least one); otherwise a ValueError naming ``where``
    (e.g. VFlowOpt's 9, 18 of 28 give 10, 21 of 32 and 1, 3 of 4). ``spread=True`` (scaled
    layers only) first separates layers that collide after rounding, moving each later one up
    to one past its predecessor (the first up to 1) and then, from the last, down below ``depth``
    (TransPrune's 7, 9, 12 of 32 round to 1, 1, 2 of 4 and spread to 1, 2, 3; SparseVLM's 3, 7,
    16 round to 0, 1, 2 and spread to 1, 2, 3). ``model`` names the stack in
    the error (ToP-ViM scales a Vim's blocks the same way)."""
    mapped = tuple(int(k * depth / reference + 0.5) if reference else int(k) for k in layers)
    if spread and reference and mapped:
        out = list(mapped)
        out[0] = max(out[0], 1)
        for i in range(1, len(out)):
            out[i] = max(out[i], out[i - 1] + 1)
        out[-1] = min(out[-1], depth - 1)
        for i in range(len(out) - 2, -1, -1):
            out[i] = min(out[i], out[i + 1] - 1)
        mapped = tuple(out)
    if any(not 1 <= k < depth for k in mapped) or any(a >= b for a, b in zip(mapped, mapped[1:])):
        raise ValueError(
            f"{where}: layers {tuple(layers)}"
            + (f" of a {reference}-layer {model}" if reference else "")
            + f" map to {mapped} on this {depth}-layer {model}; they must be strictly increasing in "
            f"[1, {depth - 1}] (pass explicit layers with a layers-of value of 0)"
        )
    return mapped


@dataclass
class Method:
    """Base class. Subclasses set the class attributes and implement :meth:`select`.

    A method never touches the model: the adapter calls :meth:`select` at every
    point returned by :meth:`points` with a :class:`TokenContext` and applies the
    :class:`Selection` it returns.
    """

    name: ClassVar[str] = ""
    #: declared metadata (``vlmprune.methods()``) and the default of :meth:`points`: the VLM
    #: stages the method acts at
    stages: ClassVar[tuple[str, ...]] = ()
    #: declared metadata and the default of :meth:`needs_for`: the signals the method may read
    needs: ClassVar[frozenset[str]] = frozenset()
    #: the roles (``"boundary"``, ``"inside"``, ``"output"``) the method can act at; default:
    #: derived from ``stages`` (``projector`` -> ``boundary``, ``encoder``/``llm`` -> ``inside``)
    roles: ClassVar[tuple[str, ...]] = ()
    training_free: ClassVar[bool] = True
    requires_cls: ClassVar[bool] = False
    paper: ClassVar[dict[str, str]] = {}
    #: how positions of kept tokens are numbered when tokens leave before the LLM:
    #: ``"compact"`` (renumbered, what LLaVA implementations do) or ``"original"``.
    positions: ClassVar[str] = "compact"
    #: how tokens kept at an ``llm``-stage point are numbered from that point on: ``"original"``
    #: (FastV and most methods) or ``"compact"`` (renumbered without gaps, decode positions
    #: shifted to match: TransPrune's and AdaToken-3D's code); adapters with multi-axis positions
    #: (Qwen's M-RoPE) keep original positions whatever the method prefers.
    llm_positions: ClassVar[str] = "original"
    #: on adapters whose projector stage works per part of an image (LLaVA-NeXT's crops): see the
    #: whole image in one call instead, its parts' tokens in the model's sequence order (HoloV's
    #: NeXT code runs once over base + un-padded tile tokens).
    projector_whole_image: ClassVar[bool] = False
    #: whether ``wrap(..., weights=...)`` may hand this method trained module weights
    #: (see :meth:`load_weights`); training-free methods leave it False.
    accepts_weights: ClassVar[bool] = False
    #: how a fraction budget ``f`` of ``n`` tokens becomes a count: ``"round"``,
    #: ``max(1, round(n * f))`` (the default), or ``"floor"``, ``max(1, int(n * f))``, as the
    #: method's official code does it (``wrap()`` hands it to the :class:`~vlmprune.budget.Budget`)
    fraction_rounding: ClassVar[str] = "round"
    #: whether ``wrap(budget=...)`` sets how many tokens the method keeps; False for a method whose
    #: own options set it (ToMe's ``r``): ``wrap()`` then refuses a budget and hands the method
    #: every token as its budget
    uses_budget: ClassVar[bool] = True
    #: whether the adapter adds ``log(size)`` of each token to the attention logits of the blocks
    #: after a merge (ToMe's proportional attention; sizes: :attr:`Reduction.sizes`); an instance
    #: may set it from an option
    proportional_attention: ClassVar[bool] = False

    seed: int = option(0, "seed of the random generator handed to select() (determinism under a seed)")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "roles" not in vars(cls):
            cls.roles = tuple(dict.fromkeys(VLM_STAGE_ROLES[s] for s in cls.stages if s in VLM_STAGE_ROLES))

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_option(self.name, f, getattr(self, f.name))

    # -- what the adapter asks before installing -------------------------------------------------
    def points(self, info: ModelInfo) -> list[Point]:
        """Pruning points, in the order they run. Default: a method acting at one boundary
        (``roles == ("boundary",)``) acts at the model's boundary point
        (``info.default_points["boundary"]``, VLMs: the projector); otherwise one point per
        declared stage."""
        if tuple(self.roles) == ("boundary",) and "boundary" in info.default_points:
            return [info.default_points["boundary"]]
        return [Point(stage) for stage in self.stages]

    def needs_for(self, info: ModelInfo) -> frozenset[str]:
        """The signals this instance reads on this model. Default: the declared ``needs`` (the
        instance's, if its options narrowed them). :meth:`check` records the answer as
        ``self.needs``, which adapters read."""
        return frozenset(self.needs)

    def requires_prefix(self, info: ModelInfo) -> bool:
        """Whether this instance needs a prefix token (a CLS token) at its points. Default: the
        class attribute ``requires_cls``."""
        return self.requires_cls

    def capture_layers(self, info: ModelInfo) -> dict[str, tuple[int, ...]]:
        """Which layers' attention projections the signals will read, per stage.

        Default: on VLMs, the feature layer for ``projector`` points, ``l - 1`` for an
        ``encoder`` point at ``l``, ``K - 1`` for an ``llm`` point at ``K`` (keys ``"encoder"``
        and ``"llm"``, always present); at any other stage, ``l - 1`` for a point at layer ``l``
        under the stage's name (a plain ViT's ``vit`` point at ``L`` reads block ``L - 1``). A
        method reading ``sublayer_io`` adds the key ``"sublayer_io"`` with the LLM layers whose
        attention and MLP inputs/outputs the adapter must keep at prefill.
        """
        out: dict[str, set[int]] = {"encoder": set(), "llm": set()}
        for p in self.points(info):
            if p.stage == "projector":
                out["encoder"].add(info.feature_layer)
            elif p.layer is not None:
                out.setdefault(p.stage, set()).add(p.layer - 1)
        return {stage: tuple(sorted(layers)) for stage, layers in out.items()}

    def encoder_per_image(self) -> bool:
        """True if encoder-stage counts differ per image, so the adapter must run the vision
        tower one image at a time (batch results then equal single-image results)."""
        return False

    def check(self, info: ModelInfo) -> None:
        """Raise a clear error if this model cannot serve the method: every point of
        :meth:`points` must name a stage the adapter offers, at a layer its spec allows (where the
        spec sets ``layers``), a prefix token must be there if :meth:`requires_prefix`, and
        :meth:`needs_for` must be among the signals the model (and the stages, where their specs
        declare signals) provide. Records ``self.needs``. A method whose points read facts this
        model's info lacks (FastV's LLM layers on a plain ViT) is refused naming its stages."""
        try:
            points = self.points(info)
        except AttributeError as e:
            raise ValueError(
                f"method {self.name!r} acts at stage(s) {list(self.stages)}, which the {info.family} adapter "
                f"does not offer (it offers {list(info.stages)}; {e})"
            ) from e
        missing = sorted({p.stage for p in points} - set(info.stages))
        if missing:
            raise ValueError(
                f"method {self.name!r} acts at stage(s) {missing}, which the {info.family} adapter "
                f"does not offer (it offers {list(info.stages)})"
            )
        for p in points:
            layers = info.stages[p.stage].layers
            if layers is not None and p.layer not in layers:
                raise ValueError(
                    f"method {self.name!r} acts at point {str(p)!r}; the {info.family} adapter's stage {p.stage!r} "
                    f"takes layers {layers.start}..{layers.stop - 1}"
                )
        specs = [info.stages[p.stage] for p in points]
        if self.requires_prefix(info) and not any(spec.has_cls for spec in specs):
            raise ValueError(
                f"method {self.name!r} needs a CLS token in the vision tower, and this model's "
                f"({info.family}) has none; choose a CLS-free method (see vlmprune.methods())"
            )
        needs = self.needs_for(info)
        lacking = set(needs) - set(info.signals) if info.signals else set()
        if lacking:
            raise ValueError(
                f"method {self.name!r} needs signal(s) {sorted(lacking)}, which the {info.family} adapter "
                f"cannot provide (it provides {list(info.signals)})"
            )
        if specs and all(spec.signals for spec in specs):
            offered = frozenset().union(*(spec.signals for spec in specs))
            if set(needs) - offered:
                raise ValueError(
                    f"method {self.name!r} needs signal(s) {sorted(set(needs) - offered)}, which the {info.family} "
                    f"adapter does not offer at stage(s) {sorted({p.stage for p in points})} (it offers {sorted(offered)})"
                )
        self.needs = needs

    def select(self, ctx: TokenContext) -> Selection:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- trained weights (methods with ``accepts_weights = True``) ---------------------------------
    def load_weights(self, weights: Any) -> None:
        """Take trained module weights: a path to a file the method's training command wrote, or
        an object the method documents (a state dict, a module). Called by ``wrap(weights=...)``."""
        raise TypeError(f"method {self.name!r} takes no trained weights")

    def resolve_weights(self, model: Any) -> None:
        """Called by ``wrap()`` when no ``weights=`` is given and none were loaded: load the
        shipped default weights for ``model`` if there are any, raise a clear error if the
        method cannot run without weights, or do nothing (a training-free default)."""
        return None

    # -- metadata -------------------------------------------------------------------------------
    @classmethod
    def options(cls) -> dict[str, dict[str, Any]]:
        return {
            f.name: {"default": f.default, "doc": f.metadata.get("doc", ""), "choices": f.metadata.get("choices")}
            for f in dataclasses.fields(cls)
        }


def _check_option(method: str, f: dataclasses.Field, value: Any) -> None:
    default = f.default
    choices = f.metadata.get("choices")
    where = f"option {f.name!r} of method {method!r}"
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, (tuple, list))
    else:
        ok = True
    if not ok:
        raise TypeError(f"{where} must be of type {type(default).__name__}, got {value!r}")
    if choices is not None and value not in choices:
        raise ValueError(f"{where} must be one of {list(choices)}, got {value!r}")
