"""The plain-ViT adapter: transformers' ``ViTModel`` / ``ViTForImageClassification``,
``CLIPVisionModel(WithProjection)``, ``SiglipVisionModel`` and ``Dinov2Model``, timm's
``VisionTransformer`` and open_clip's ``VisionTransformer`` (the rows of :data:`FLAVOURS`, matched
by class, since timm and open_clip models have no ``config.model_type``): the proof that a family
which is not a VLM needs no edit of the core or of a method.

One stage, ``vit``: a point at layer ``l`` (1..depth) removes patch tokens before block ``l``
runs; ``l = depth`` means after the last block, before the final layernorm (a tower with none
there, CLIP and open_clip, prunes the last block's output). The prefix (CLS token, timm's
registers, DeiT's distillation token) is never pruned, so ``Selection.keep_cls`` changes nothing
here. Whatever pools after the tower reads the pruned sequence: CLS pooling, timm's
``global_pool="avg"`` and open_clip's ``pool_type="avg"`` (the mean over the kept patches),
attention pooling heads. Methods that act at
the boundary role (DivPrune, uniform, random, VisionZip) act at ``Point("vit", L)``, ``L`` being
the adapter option ``boundary_layer`` (default: depth). Tokens leave by shortening the hidden
states in a pre-hook of block ``L`` (of the final layernorm at ``L = depth``), so
``last_hidden_state`` holds the CLS token and the kept patches, and the classifier (CLS pooling)
reads the pruned sequence. Signals at a point: ``hidden`` (the patch tokens), ``projected`` (the
same tokens: a ViT has no projector), and ``cls_attention`` / ``encoder_qkv`` /
``encoder_attention`` of block ``l - 1``, captured through the tower's anatomy
(:mod:`.vision`). An encoder attention mask given to the model is refused while pruning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmprune.context import ModelInfo, Point, Signals, StageSpec
from vlmprune.method import Method

from .base import (
    Adapter,
    AdapterOption,
    Installed,
    Plan,
    read_arg,
    register_adapter,
    write_arg,
)
from .runtime import Runtime
from .vision import (
    EncoderCapture,
    VisionTower,
    encoder_signals,
    install_capture,
    install_encoder_pruning,
)

#: what a ``vit`` point offers: the tokens, ``projected`` as the identity (no projector on a ViT),
#: and the attention signals of the block before the point
SIGNALS = ("hidden", "projected", "cls_attention", "encoder_qkv", "encoder_attention")
#: what a ``vit_mlp`` point offers: the tokens, the attention signals of the block it sits in, and
#: ``sizes`` (how many patches each token stands for after earlier merges)
MID_SIGNALS = ("hidden", "cls_attention", "encoder_qkv", "encoder_attention", "sizes")

#: between blocks; ``layers`` (1..depth) and ``prefix`` (the tower's, the CLS token) are set per
#: model; rows may keep different counts (padded, the padding masked out of attention)
STAGE = StageSpec("vit", "inside", signals=frozenset(SIGNALS), ragged=True)
#: inside block ``l`` (0..depth-1), between its attention and its MLP (ToMe merges there); offered
#: where the tower's anatomy row names the MLP branch
MID_STAGE = StageSpec("vit_mlp", "inside", signals=frozenset(MID_SIGNALS))

OPTIONS = {
    "boundary_layer": AdapterOption(
        choices=(),
        doc="the layer L (an int, 1..depth) of the boundary point Point('vit', L) where boundary methods act; "
        "None: depth, after the last block, the tokens the classifier's CLS pooling reads (the counterpart of "
        "a VLM's projector input)",
    )
}


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _hf_sizes(tower: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    config = tower.config
    return _pair(config.image_size), _pair(config.patch_size)


@dataclass(frozen=True)
class Flavour:
    """One kind of model the adapter serves (a row of :data:`FLAVOURS`). ``classes``: the model
    classes (``"module.Name"``, matched over the MRO, so nothing is imported to match);
    ``tower``: paths from the model to the tower that :class:`.vision.VisionTower` reads (the
    first the model has; ``""``: the model itself); ``embed``: the path from the tower to the
    module whose first argument is the pixels (its pre-hook starts a forward); ``sizes``: the
    tower's ``(image size, patch size)``, each ``(h, w)`` (``embed`` and ``sizes`` None: those of
    the tower's own row, for a model that wraps a served tower); ``dense``: the model's per-token
    head (a module whose output is ``[B, N, D]`` over the patches), or None: a model with a dense
    head gets every patch back before it (stage ``restore="head"``); ``pools``: whether the
    model's output pools over all tokens (a mean, an attention pooler), which rows padded to one
    length would change."""

    name: str
    classes: tuple[str, ...]
    tower: tuple[str, ...]
    embed: str | None
    sizes: Callable[[nn.Module], tuple[tuple[int, int], tuple[int, int]]] | None
    dense: Callable[[nn.Module], nn.Module | None] = lambda model: None
    pools: Callable[[nn.Module], bool] = lambda model: False


_TF = "transformers.models."
#: the models the adapter serves; other heads of these families (masked image modelling) read
#: every patch back, so they are not listed
FLAVOURS: tuple[Flavour, ...] = (
    Flavour("vit", (_TF + "vit.modeling_vit.ViTModel", _TF + "vit.modeling_vit.ViTForImageClassification"),
            ("vit", ""), "embeddings", _hf_sizes),
    Flavour("clip", (_TF + "clip.modeling_clip.CLIPVisionModel", _TF + "clip.modeling_clip.CLIPVisionModelWithProjection"),
            ("vision_model", ""), "embeddings", _hf_sizes),
    Flavour("siglip", (_TF + "siglip.modeling_siglip.SiglipVisionModel",), ("vision_model", ""), "embeddings", _hf_sizes,
            pools=lambda m: getattr(getattr(m, "vision_model", m), "head", None) is not None),
    Flavour("dinov2", (_TF + "dinov2.modeling_dinov2.Dinov2Model",), ("",), "embeddings", _hf_sizes),
    Flavour("timm", ("timm.models.vision_transformer.VisionTransformer",), ("",), "patch_embed",
            lambda t: (_pair(t.patch_embed.img_size), _pair(t.patch_embed.patch_size)),
            pools=lambda m: m.global_pool not in ("token", "")),
    Flavour("open_clip", ("open_clip.transformer.VisionTransformer",), ("",), "conv1",
            lambda t: (_pair(t.image_size), _pair(t.patch_size)),
            pools=lambda m: getattr(m, "attn_pool", None) is not None or getattr(m, "pool_type", "tok") != "tok"),
    # the embedded ViT-S/14 with a task head (vlmprune.embedded.vit): a segmentation head is dense
    Flavour("embedded", ("vlmprune.embedded.vit.EmbeddedViT",), ("backbone",), None, None,
            dense=lambda model: model.head.classifier if hasattr(model.head, "token_logits") else None,
            pools=lambda model: model.head is not None and not hasattr(model.head, "token_logits")),
)


def flavour_of(model: nn.Module) -> Flavour | None:
    """The :data:`FLAVOURS` row serving ``model`` (None: none does)."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(model).__mro__}
    return next((row for row in FLAVOURS if names & set(row.classes)), None)


def _at(obj, path: str):
    for name in filter(None, path.split(".")):
        obj = getattr(obj, name)
    return obj


@dataclass
class ViTInfo(ModelInfo):
    """:class:`ModelInfo` of a plain ViT plus the tower facts that boundary methods written for
    VLMs read: ``feature_layer``, the block whose output the boundary point receives (``L - 1``;
    VisionZip takes its CLS attention there, as at a VLM's feature layer), ``has_cls`` and
    ``encoder_layers`` (the blocks; HiPrune, HoloV and FoPru place their attention layers by it)."""

    feature_layer: int = 0
    has_cls: bool = True
    encoder_layers: int = 0


@register_adapter
class ViTAdapter(Adapter):
    #: the family's name in the error listing supported models; :meth:`matches` reads :data:`FLAVOURS`
    model_types = ("vit",)
    stages = ("vit",)
    options = OPTIONS

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.flavour = flavour_of(model)
        self.vit = _tower(model, self.flavour.tower)
        self.tower = VisionTower(self.vit)
        own = self.flavour if self.flavour.sizes is not None else flavour_of(self.vit)
        if own is None:
            raise ValueError(f"{type(model).__name__} holds a {type(self.vit).__name__}, which no ViT flavour serves")
        self.embed = own.embed
        self.image_size, self.patch_size = own.sizes(self.vit)
        self.dense = self.flavour.dense(model)
        if self.dense is not None and getattr(model.head, "block", self.tower.depth - 1) != self.tower.depth - 1:
            raise ValueError("this model's head reads an earlier block's tokens (an auxiliary head); wrap the model "
                             "whose head reads the last block")
        #: open_clip towers built with ``batch_first=False`` run their blocks sequence first
        self.seq_first = getattr(getattr(self.vit, "transformer", None), "batch_first", True) is False

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """By class, over the MRO (:data:`FLAVOURS`)."""
        return flavour_of(model) is not None

    def boundary_layer(self, value: Any = None) -> int:
        """The boundary point's layer: ``value`` checked (an int in 1..depth), None: depth."""
        depth = self.tower.depth
        if value is None:
            return depth
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= depth:
            raise ValueError(f"parameter 'boundary_layer' must be an int in [1, {depth}] or None, got {value!r}")
        return value

    def info(self, boundary_layer: int | None = None) -> ViTInfo:
        """The model's facts with the boundary at ``boundary_layer`` (None: the value ``wrap()``
        gave, else depth); grid and count from the tower's image and patch size (its flavour's
        ``sizes``; another image size the tower accepts is read from the pixels at run time)."""
        if boundary_layer is None:
            boundary_layer = self.given.get("boundary_layer")
        layer = self.boundary_layer(boundary_layer)
        grid = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        tower = self.tower
        stage = replace(STAGE, layers=range(1, tower.depth + 1), prefix=tower.prefix, cls=tower.has_cls,
                        restore="head" if self.dense is not None else None)
        stages = {stage.name: stage}
        if tower.anatomy.mlp is not None:
            stages[MID_STAGE.name] = replace(MID_STAGE, layers=range(tower.depth), prefix=tower.prefix, cls=tower.has_cls)
        return ViTInfo(
            family="vit",
            stages=stages,
            default_points={"boundary": Point(stage.name, layer)},
            grid=grid,
            n_tokens=grid[0] * grid[1],
            signals=tuple(dict.fromkeys(SIGNALS + MID_SIGNALS)),
            feature_layer=layer - 1,
            has_cls=self.tower.has_cls,
            encoder_layers=self.tower.depth,
        )

    def check_options(self, values: dict[str, Any], method: Method, points: list[Point]) -> dict[str, Any]:
        value = values.get("boundary_layer")
        if value is not None:
            self.boundary_layer(value)
        return {"boundary_layer": value}

    def captured_blocks(self, plan: Plan) -> tuple[int, ...]:
        """The blocks whose q/k/v the method reads: its ``capture_layers`` under the names of this
        adapter's stages and under ``"encoder"`` (the vision tower, as methods written for VLMs
        name it), each of which must have run at the method's last point (before block ``L``,
        blocks ``0..L-1`` have; between attention and MLP of block ``l``, blocks ``0..l``)."""
        blocks = sorted({b for key in ("vit", "vit_mlp", "encoder") for b in plan.capture.get(key, ())})
        last = max((p.layer + (p.stage == "vit_mlp") for p in plan.points), default=0)
        late = [b for b in blocks if not 0 <= b < last]
        if late:
            where = plan.points[-1] if plan.points else "no point"
            raise ValueError(
                f"method {plan.method.name!r} reads the attention of block(s) {late}, which have not run at its last "
                f"point {where} (blocks 0..{last - 1} have); on a ViT its signals come from a block after the tokens it prunes"
            )
        return tuple(blocks)

    def check_plan(self, method: Method, points: list[Point]) -> None:
        """A method asking for proportional attention needs blocks that take an attention mask."""
        if method.proportional_attention and points:
            try:
                self.tower.attention_bias()
            except ValueError as e:
                raise ValueError(
                    f"method {method.name!r} asks for proportional attention: {e}; turn it off in its options "
                    "(ToMe: prop_attn=False)"
                ) from None

    def _optional_bias(self) -> tuple[str, int, str] | None:
        """The blocks' attention-mask argument where they take one (rows padded after a point
        that kept different counts per image are masked through it), else None."""
        try:
            return self.tower.attention_bias()
        except ValueError:
            return None

    def install(self, plan: Plan) -> Installed:
        info = self.info(plan.adapter_options.get("boundary_layer"))
        blocks = self.captured_blocks(plan)  # refused before any hook is installed
        tower = self.tower
        mids = [p.layer for p in plan.points if p.stage == "vit_mlp"]
        branches = {layer: tower.mlp_branch(layer) for layer in mids}
        bias = tower.attention_bias() if plan.method.proportional_attention and plan.points else self._optional_bias()
        installed = Installed()
        rt = ViTRuntime(plan, info, self)
        rt.bias_spec = bias
        installed.hook(_at(self.vit, self.embed).register_forward_pre_hook(rt.start, with_kwargs=True))
        batch_first = _batch_first if self.seq_first else (lambda fn: fn)
        for point in plan.points:
            if point.stage == "vit_mlp":
                continue
            if point.layer == tower.depth and tower.final_norm is None:
                installed.hook(tower.layers[-1].register_forward_hook(_pruning_output(batch_first(rt.prune), point.layer)))
            else:
                install_encoder_pruning(installed, tower, point.layer, batch_first(rt.prune))
        for layer, (entry, end) in branches.items():
            installed.hook(entry.register_forward_pre_hook(_first_argument(batch_first(rt.merge_entry), layer)))
            installed.hook(end.register_forward_hook(_output(batch_first(rt.merge_exit), layer)))
            installed.hook(tower.layers[layer].register_forward_hook(_output(batch_first(rt.merge_done), layer)))
        if self.dense is not None and plan.points:
            if tower.final_norm is not None:
                installed.hook(tower.final_norm.register_forward_pre_hook(_first_argument(batch_first(rt.restore), tower.depth)))
            else:
                installed.hook(tower.layers[-1].register_forward_hook(_output(batch_first(rt.restore), tower.depth)))
            installed.hook(self.dense.register_forward_hook(_output(rt.write_exits, tower.depth)))
        if bias is not None:
            for block in tower.layers:
                installed.hook(block.register_forward_pre_hook(rt.bias_hook(bias), with_kwargs=True))
        install_capture(installed, tower, blocks, lambda: rt.capture, lambda: rt.alive)
        self.runtime = rt
        return installed


def _batch_first(fn: Callable[[int, torch.Tensor], torch.Tensor]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``fn`` on batch-first tensors, called with and returning sequence-first ones (open_clip
    towers built with ``batch_first=False``)."""

    def wrapped(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return fn(layer, hidden.transpose(0, 1)).transpose(0, 1)

    return wrapped


def _first_argument(fn: Callable[[int, torch.Tensor], torch.Tensor], layer: int):
    """A forward pre-hook replacing the module's first argument ``x`` by ``fn(layer, x)``."""

    def hook(module, args):
        return (fn(layer, args[0]), *args[1:])

    return hook


def _output(fn: Callable[[int, torch.Tensor], torch.Tensor], layer: int):
    """A forward hook replacing the module's output (a tensor, or a tuple whose first item is the
    hidden states) ``y`` by ``fn(layer, y)``."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(layer, output[0]), *output[1:])
        return fn(layer, output)

    return hook


def _tower(model: nn.Module, paths: tuple[str, ...]) -> nn.Module:
    """The module at the first of ``paths`` that ``model`` has."""
    for path in paths:
        try:
            return _at(model, path)
        except AttributeError:
            continue
    raise ValueError(f"{type(model).__name__} has no vision tower at {list(paths)}")


def _pruning_output(prune: Callable[[int, torch.Tensor], torch.Tensor], layer: int):
    """A forward hook of the last block that prunes its output: the boundary ``vit:depth`` of a
    tower with no final norm over the whole sequence (CLIP's ``post_layernorm`` and open_clip's
    pooling read the pruned sequence)."""
    return _output(prune, layer)


class ViTRuntime(Runtime):
    """The hooks' shared state for one forward: the capture store; the raster indices of the
    patches alive (``[B, N_alive]``, -1 for padding); ``lengths``, each row's count once a point
    kept different counts per image (rows then padded at the end, None before); the sizes
    (patches each token stands for, prefix first; None: one each); the attention bias the next
    blocks add (``log(sizes)``, -inf on padding); the merge of the block running (``vit_mlp``
    points); and for a model with a dense head, what ``restore`` needs: each patch's slot among
    the tokens alive (-1: gone), the hidden state each gone patch had when it left, and the
    outputs a method gave it (``Selection.exit_outputs``)."""

    def __init__(self, plan: Plan, info: ModelInfo, adapter: ViTAdapter):
        super().__init__(plan, info)
        self.adapter = adapter
        self.capture = EncoderCapture()
        self.alive: torch.Tensor | None = None
        self.lengths: list[int] | None = None
        self.sizes: torch.Tensor | None = None
        self.key_bias: torch.Tensor | None = None
        self.pending: dict[int, list] = {}  # block -> [reduction, merged input of its MLP, MLP branch output]
        #: blocks captured for their own vit_mlp point only, released once it ran
        self.release = set(plan.capture.get("vit_mlp", ())) - set(plan.capture.get("vit", ())) - set(plan.capture.get("encoder", ()))
        self.restoring = adapter.dense is not None
        #: the blocks' attention-mask argument (anatomy ``attention_bias``), None where they take none
        self.bias_spec: tuple[str, int, str] | None = None
        self.owner: torch.Tensor | None = None  # [B, N]
        self.left: torch.Tensor | None = None  # [B, N, C]
        self.exits: torch.Tensor | None = None  # [B, N, D]
        self.exited: torch.Tensor | None = None  # [B, N] bool

    def start(self, module, args, kwargs) -> None:
        """Pre-hook of the embeddings: a new forward on the grid of these pixels."""
        pixels = read_arg(args, kwargs, "pixel_values", 0)
        ph, pw = self.adapter.patch_size
        grid = (pixels.shape[-2] // ph, pixels.shape[-1] // pw)
        n = grid[0] * grid[1]
        self.begin(n, grid, pixels.device)
        self.capture = EncoderCapture()
        self.alive = torch.arange(n, device=pixels.device).expand(pixels.shape[0], -1)
        self.lengths = self.sizes = self.key_bias = None
        self.pending = {}
        self.owner = self.alive.clone() if self.restoring else None
        self.left = self.exits = self.exited = None

    # -- points between blocks -------------------------------------------------------------------
    def prune(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run the method at ``Point("vit", layer)`` on the patches of ``hidden`` (prefix first);
        returns the prefix and the kept (or merged) patches, rows padded where their counts differ."""
        point, prefix = Point("vit", layer), self.adapter.tower.prefix
        if self.lengths is None:
            reduction = self._run(point, hidden, layer - 1, range(hidden.shape[0]))
            rows, alive, sizes = reduction.tokens(hidden), reduction.apply(self.alive), self._carried(reduction)
            self._track(reduction, hidden[:, prefix:])
            if not reduction.ragged:
                self.alive, self.sizes = alive, sizes
                self._bias()
                return rows
            sizes = sizes if sizes is not None else [None] * len(rows)
        else:  # rows padded by an earlier point: one call per image on its own tokens
            rows, alive, sizes, start = [], [], [], len(self.stats.points)
            for i, n in enumerate(self.lengths):
                one = hidden[i : i + 1, : prefix + n]
                reduction = self._run(point, one, None, [i])
                rows.append(_row(reduction.tokens(one)))
                alive.append(_row(reduction.apply(self.alive[i : i + 1, :n])))
                carried = self._carried(reduction)
                sizes.append(None if carried is None else _row(carried))
                self._track(reduction, one[:, prefix:], row=i)
            self.stats.points[start:] = [_joined(self.stats.points[start:])]
        return self._pad(rows, alive, sizes)

    def _run(self, point: Point, hidden: torch.Tensor, layer: int | None, rows):
        """The method at ``point`` on the patches of ``hidden`` (the images ``rows``); the
        captured attention signals of block ``layer`` (None: unpadded rows of a padded batch,
        which have none)."""
        tower = self.adapter.tower
        patches = hidden[:, tower.prefix :]
        first = rows[0]
        alive = self.alive[first : first + hidden.shape[0], : patches.shape[1]]
        captured = encoder_signals(tower, self.capture, alive, layer) if layer is not None else {}
        signals = Signals({**captured, "hidden": lambda: patches, "projected": lambda: patches})
        cls_token = hidden[:, 0] if tower.has_cls else None
        sizes = self._sizes(hidden, first)
        images = None if layer is not None else list(rows)
        return self.run(point, patches, alive, signals, images=images, cls_token=cls_token, sizes=sizes)

    def _sizes(self, hidden: torch.Tensor, first: int = 0) -> torch.Tensor:
        """The sizes of ``hidden``'s tokens (rows from ``first``), prefix first: one each before
        any merge."""
        if self.sizes is None:
            return torch.ones(hidden.shape[:2], device=hidden.device)
        return self.sizes[first : first + hidden.shape[0], : hidden.shape[1]]

    def _carried(self, reduction):
        """The sizes after ``reduction`` (prefix first; a list for per-image keep lists), None
        while nothing was merged."""
        if self.sizes is None and reduction.selection.merge_map is None:
            return None
        return reduction.sizes

    def _pad(self, rows: list[torch.Tensor], alive: list[torch.Tensor], sizes: list) -> torch.Tensor:
        """Rows of different lengths as one batch padded at the end (zeros; alive -1; the
        padding masked out of attention by :meth:`bias_hook`); equal lengths: stacked."""
        lengths = [a.shape[0] for a in alive]
        if len(set(lengths)) == 1:
            self.lengths = None
            self.alive = torch.stack(alive)
            self.sizes = None if sizes[0] is None else torch.stack(sizes)
            self._bias()
            return torch.stack(rows)
        if self.bias_spec is None:
            raise RuntimeError(
                f"method {self.method.name!r} kept different counts per image ({lengths}); the "
                f"{self.adapter.tower.flavour} tower's blocks take no attention mask to pad them with"
            )
        if self.adapter.dense is None and self.adapter.flavour.pools(self.adapter.model):
            raise RuntimeError(
                f"method {self.method.name!r} kept different counts per image ({lengths}); this model pools the "
                "mean of its tokens, which padding would change: run one image at a time or keep equal counts"
            )
        longest, prefix = max(lengths), self.adapter.tower.prefix
        self.lengths = lengths
        self.alive = torch.stack([F.pad(a, (0, longest - a.shape[0]), value=-1) for a in alive])
        if sizes[0] is not None:
            self.sizes = torch.stack([F.pad(z, (0, longest + prefix - z.shape[0]), value=1.0) for z in sizes])
        self._bias()
        return torch.stack([F.pad(r, (0, 0, 0, longest + prefix - r.shape[0])) for r in rows])

    def _bias(self) -> None:
        """The attention bias of the blocks to come: ``log(sizes)`` under proportional
        attention, -inf on padding; None when neither applies."""
        bias = self.sizes.log() if self.sizes is not None and self.method.proportional_attention else None
        if self.lengths is not None:
            prefix = self.adapter.tower.prefix
            pad = torch.cat([torch.zeros_like(self.alive[:, :prefix], dtype=torch.float), (self.alive < 0).float()], 1)
            pad = pad.masked_fill(pad > 0, float("-inf"))
            bias = pad if bias is None else bias + pad
        self.key_bias = bias

    # -- dense heads: every patch back -----------------------------------------------------------
    def _track(self, reduction, patches: torch.Tensor, row: int | None = None) -> None:
        """Follow each original patch through ``reduction`` (rows ``row``, or all): the slot it
        now lives in, or, if its token left, the hidden state it left with and the output the
        method gave it (``Selection.exit_outputs``)."""
        if not self.restoring:
            return
        sel = reduction.selection
        rows = range(patches.shape[0]) if row is None else [row]
        n = patches.shape[1]
        for j, i in enumerate(rows):
            keep = sel.keep[j].to(patches.device)
            slot = sel.merge_map[j].to(patches.device) if sel.merge_map is not None else None
            if slot is None:
                slot = torch.full((n,), -1, dtype=torch.long, device=patches.device)
                slot[keep] = torch.arange(keep.shape[0], device=patches.device)
            own = self.owner[i]
            here = own >= 0
            cur = own.clamp(min=0)
            gone = here & (slot[cur] < 0)
            if bool(gone.any()):
                if self.left is None:
                    self.left = patches.new_zeros(self.owner.shape[0], self.owner.shape[1], patches.shape[-1])
                    self.exited = torch.zeros_like(self.owner, dtype=torch.bool)
                self.left[i, gone] = patches[j, cur[gone]]
                if sel.exit_outputs is not None:
                    outs = sel.exit_outputs[j]
                    if self.exits is None:
                        self.exits = outs.new_zeros(self.owner.shape[0], self.owner.shape[1], outs.shape[-1])
                    self.exits[i, gone] = outs[cur[gone]].to(self.exits.dtype)
                    self.exited[i] |= gone
            self.owner[i] = torch.where(here, slot[cur], own)

    def restore(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Before the dense head: every patch back in raster order, prefix first (a patch alive
        gets its token's state, merged ones a copy of their group's, a patch that left the state
        it left with); padding gone."""
        prefix = self.adapter.tower.prefix
        b, n = self.owner.shape
        body = hidden[:, prefix:]
        full = body.gather(1, self.owner.clamp(min=0).unsqueeze(-1).expand(b, n, body.shape[-1]))
        if self.left is not None:
            full = torch.where((self.owner < 0).unsqueeze(-1), self.left.to(full.dtype), full)
        self.alive = torch.arange(n, device=hidden.device).expand(b, -1)
        self.lengths = None
        return torch.cat([hidden[:, :prefix], full], 1)

    def write_exits(self, layer: int, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the dense head: patches a method gave an exit output (DToP's early
        predictions) take it instead of the head's."""
        if self.exits is None:
            return output
        return torch.where(self.exited.unsqueeze(-1), self.exits.to(output.dtype), output)

    # -- points between attention and MLP -------------------------------------------------------
    def merge_entry(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-hook of block ``layer``'s MLP norm: run the method at ``Point("vit_mlp", layer)``
        on the residual stream after attention; the MLP branch gets the reduced tokens."""
        if self.lengths is not None:
            raise RuntimeError("a vit_mlp point after a point that kept different counts per image is not supported")
        tower = self.adapter.tower
        sizes = self._sizes(hidden)
        patches = hidden[:, tower.prefix :]
        signals = Signals({**encoder_signals(tower, self.capture, self.alive, layer), "hidden": lambda: patches,
                           "sizes": lambda: sizes[:, tower.prefix :]})
        cls_token = hidden[:, 0] if tower.has_cls else None
        reduction = self.run(Point("vit_mlp", layer), patches, self.alive, signals, cls_token=cls_token, sizes=sizes)
        if reduction.ragged:
            raise RuntimeError(f"method {self.method.name!r} kept different counts per image at a vit_mlp point")
        reduced = reduction.tokens(hidden)
        self._track(reduction, patches)
        self.pending[layer] = [reduction, reduced, None]
        return reduced

    def merge_exit(self, layer: int, branch: torch.Tensor) -> torch.Tensor:
        """Forward hook of the MLP branch's last module: keep its output on the reduced tokens and
        hand the block every token back (a merged token's output copied to each token in it), so
        the block's own residual add runs; :meth:`merge_done` replaces the block's result."""
        pending = self.pending[layer]
        pending[2] = branch
        return pending[0].restore(branch, fill="copy")

    def merge_done(self, layer: int, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of block ``layer``: its output is the reduced residual stream plus the MLP
        branch's output on it (ToMe's ``x = x + mlp(norm2(x))`` after the merge)."""
        reduction, reduced, branch = self.pending.pop(layer)
        self.alive = reduction.apply(self.alive)
        self.sizes = reduction.sizes
        self._bias()
        if layer in self.release:
            self.capture.qkv.pop(layer, None)
        return reduced + branch

    def bias_hook(self, spec: tuple[str, int, str]):
        """A forward pre-hook for every block: pass the attention bias (:meth:`_bias`) as the
        block's additive attention mask (``spec``: the anatomy row's ``attention_bias``)."""
        name, position, layout = spec
        tower = self.adapter.tower

        def hook(module, args, kwargs):
            if self.key_bias is None:
                return None
            if read_arg(args, kwargs, name, position) is not None:
                raise NotImplementedError("an attention bias (proportional attention, padding) with an attention mask of the caller is not supported")
            hidden = args[0] if args else next(iter(kwargs.values()))
            mask = tower.bias_mask(self.key_bias, layout, hidden.dtype)
            return write_arg(args, kwargs, name, mask, position)

        return hook


def _row(x):
    """Row 0 of a one-row result (a tensor or a one-item list)."""
    return x[0]


def _joined(records: list[dict]) -> dict:
    """Stats entries of one point called once per image, as one entry."""
    return {"point": records[0]["point"], "in": [v for r in records for v in r["in"]], "out": [v for r in records for v in r["out"]]}
