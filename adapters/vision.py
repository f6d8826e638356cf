"""Vision-encoder mechanics shared by adapters: the anatomy of ViT-like towers (as data), capturing
per-head q/k/v, pruning between encoder blocks, and the encoder signals (CLS attention computed
from q and k).

Towers differ in names, not in kind. :data:`ANATOMY` holds one row per flavour: where its blocks
are, how a block projects q/k/v (separate Linears, one fused ``qkv`` Linear, or
``nn.MultiheadAttention``'s ``in_proj``), its head count, its prefix tokens (CLS, registers,
distillation token) and the norm the sequence passes after the last block. Everything here works
through hooks on the tower's own modules, so what lives inside a block (timm's and DINOv2's
LayerScale, open_clip's ``ls_1``/``ls_2``) runs as the tower wrote it; no forward is copied.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmprune.primitives.scoring import attention_rows

from .base import Installed, read_arg, write_arg


@dataclass(frozen=True)
class Anatomy:
    """One flavour of ViT-like tower (a row of :data:`ANATOMY`).

    A tower matches the row when its class (or a base class) is one of ``classes``
    (``"module.Name"``) or its ``config.model_type`` is one of ``model_types``. Paths are dotted
    attribute paths; where a tuple gives several, the first the tower has wins (transformers
    renamed modules between versions). ``attention``: ``"separate"`` (``projections`` holds
    alternative q, k, v path triples from a block), ``"fused"`` (one Linear whose output is q, k, v
    one after another, then heads) or ``"mha"`` (an ``nn.MultiheadAttention`` with
    ``in_proj_weight``). ``heads``: a path from the tower (``tower.``) or a block (``block.``).
    ``prefix``: terms summed into the count of tokens before the patches (ints, or paths from the
    tower). ``cls``: whether the first prefix token is a class token (a bool, or a path from the
    tower that is not None when it is). ``qk_norm``: paths from a block to the norms applied to q
    and k after the projection (timm's ``qk_norm=True``). ``final_norm``: paths from the tower to
    the norm the whole sequence passes after the last block (empty: none does, e.g. CLIP, whose
    ``post_layernorm`` sees the pooled CLS only). ``mlp``: paths from a block to the norm that
    opens its MLP branch (its input is the residual stream after attention) and to the last
    module of that branch before the residual add (where ToMe merges, between attention and MLP).
    ``attention_bias``: the block's forward argument (name, position) that takes an additive
    attention mask, and its layout: ``"keys"`` (``[B, 1, 1, T]``, one bias per key) or
    ``"heads"`` (``[B * heads, T, T]``, ``nn.MultiheadAttention``'s float mask).
    """

    flavour: str
    blocks: tuple[str, ...]
    attention: str
    projections: tuple[tuple[str, ...], ...]
    heads: str
    prefix: tuple[int | str, ...]
    cls: bool | str
    model_types: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    qk_norm: tuple[str, str] | None = None
    final_norm: tuple[str, ...] = ()
    mlp: tuple[str, str] | None = None
    attention_bias: tuple[str, int, str] | None = None


_HF_HEADS = "tower.config.num_attention_heads"
_HF_ENCODER = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),)
#: ViT-style HF towers: ``attention.q_proj`` since transformers 5.x (ViT, DeiT) or 5.2x (DINOv2),
#: ``attention.attention.query`` before
_HF_VIT = (
    ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
)

#: transformers' encoder layers take an additive mask as their second argument
_HF_BIAS = ("attention_mask", 1, "keys")

#: The ViT-like towers vlmprune knows, one row per flavour.
ANATOMY: tuple[Anatomy, ...] = (
    Anatomy("clip", ("encoder.layers",), "separate", _HF_ENCODER, _HF_HEADS, (1,), True,
            model_types=("clip_vision_model",), mlp=("layer_norm2", "mlp"), attention_bias=_HF_BIAS),
    Anatomy("siglip", ("encoder.layers",), "separate", _HF_ENCODER, _HF_HEADS, (0,), False,
            model_types=("siglip_vision_model", "siglip2_vision_model"),
            final_norm=("post_layernorm",), mlp=("layer_norm2", "mlp"), attention_bias=_HF_BIAS),
    Anatomy("dinov2", ("encoder.layer",), "separate", _HF_VIT, _HF_HEADS, (1,), True,
            model_types=("dinov2",), final_norm=("layernorm",), mlp=("norm2", "layer_scale2"), attention_bias=_HF_BIAS),
    Anatomy("dinov2_with_registers", ("encoder.layer",), "separate", _HF_VIT, _HF_HEADS,
            (1, "config.num_register_tokens"), True, model_types=("dinov2_with_registers",), final_norm=("layernorm",),
            mlp=("norm2", "layer_scale2"), attention_bias=_HF_BIAS),
    Anatomy("vit", ("layers", "encoder.layer"), "separate", _HF_VIT, _HF_HEADS, (1,), True,
            model_types=("vit",), final_norm=("layernorm",), mlp=("layernorm_after", "mlp"), attention_bias=_HF_BIAS),
    Anatomy("deit", ("layers", "encoder.layer"), "separate", _HF_VIT, _HF_HEADS, (2,), True,  # CLS + distillation
            model_types=("deit",), final_norm=("layernorm",)),
    Anatomy("timm", ("blocks",), "fused", (("attn.qkv",),), "block.attn.num_heads", ("num_prefix_tokens",), "cls_token",
            classes=("timm.models.vision_transformer.VisionTransformer",), qk_norm=("attn.q_norm", "attn.k_norm"),
            final_norm=("norm",), mlp=("norm2", "drop_path2"), attention_bias=("attn_mask", 1, "keys")),
    Anatomy("open_clip", ("transformer.resblocks",), "mha", (("attn",),), "block.attn.num_heads", (1,), True,
            classes=("open_clip.transformer.VisionTransformer",), mlp=("ln_2", "ls_2"),
            attention_bias=("attn_mask", 3, "heads")),
)


def _path(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _first(obj, paths: tuple[str, ...]):
    """The module at the first of ``paths`` that ``obj`` has (None: none)."""
    for path in paths:
        try:
            return _path(obj, path)
        except AttributeError:
            continue
    return None


def anatomy_of(tower: nn.Module) -> Anatomy:
    """The :data:`ANATOMY` row of ``tower``; a ValueError naming the supported flavours if none."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(tower).__mro__}
    model_type = getattr(getattr(tower, "config", None), "model_type", None)
    for row in ANATOMY:
        if names & set(row.classes) or (model_type is not None and model_type in row.model_types):
            return row
    supported = "; ".join(f"{row.flavour} ({', '.join(row.model_types or row.classes)})" for row in ANATOMY)
    raise ValueError(
        f"unknown vision tower {type(tower).__name__} (model_type={model_type!r}); supported tower flavours: {supported}"
    )


class VisionTower:
    """A ViT-like tower read through its :data:`ANATOMY` row: ``layers`` (its blocks), per block
    the attention modules, ``heads``, ``head_dim``, ``prefix`` (tokens before the patches: CLS,
    registers, distillation token), ``has_cls`` (the first prefix token is a class token; for
    every flavour but a timm tower built without one, ``prefix > 0``) and ``final_norm``."""

    def __init__(self, tower: nn.Module):
        self.tower = tower
        self.anatomy = row = anatomy_of(tower)
        self.flavour = row.flavour
        self.model_type = getattr(getattr(tower, "config", None), "model_type", row.flavour)
        blocks = _first(tower, row.blocks)
        if blocks is None or not len(blocks):
            raise ValueError(f"the {row.flavour} tower {type(tower).__name__} has no blocks at {list(row.blocks)}")
        self.layers = blocks
        self.attention = [self._attention_of(block) for block in blocks]
        root, _, path = row.heads.partition(".")
        self.heads = int(_path(tower if root == "tower" else blocks[0], path))
        width = {"separate": lambda m: m[0].out_features, "fused": lambda m: m[0].out_features // 3,
                 "mha": lambda m: m[0].embed_dim}[row.attention](self.attention[0])
        self.head_dim = width // self.heads
        self.prefix = sum(term if isinstance(term, int) else int(_path(tower, term)) for term in row.prefix)
        self.has_cls = row.cls if isinstance(row.cls, bool) else _first(tower, (row.cls,)) is not None
        self.final_norm = _first(tower, row.final_norm)
        self.qk_norms = [self._qk_norms(block) for block in blocks]

    def _attention_of(self, block: nn.Module) -> tuple[nn.Module, ...]:
        row = self.anatomy
        for paths in row.projections:
            modules = tuple(_first(block, (p,)) for p in paths)
            if all(m is not None for m in modules):
                break
        else:
            raise ValueError(f"the {row.flavour} block {type(block).__name__} has none of the attention projections {row.projections}")
        if row.attention == "mha":
            if not isinstance(modules[0], nn.MultiheadAttention) or modules[0].in_proj_weight is None:
                raise ValueError(
                    f"the {row.flavour} block {type(block).__name__} attends with {type(modules[0]).__name__}; only "
                    "nn.MultiheadAttention with one in_proj_weight is supported (not custom attention blocks)"
                )
        elif not all(isinstance(m, nn.Linear) for m in modules):
            raise ValueError(f"the {row.flavour} block {type(block).__name__}: attention projections {paths} are not Linear")
        return modules

    def _qk_norms(self, block: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        norms = tuple(_first(block, (p,)) for p in self.anatomy.qk_norm or ())
        return norms if norms and not all(m is None or isinstance(m, nn.Identity) for m in norms) else None

    @property
    def depth(self) -> int:
        return len(self.layers)

    def mlp_branch(self, layer: int) -> tuple[nn.Module, nn.Module]:
        """(the norm that opens block ``layer``'s MLP branch, the branch's last module before
        the residual add): the anatomy row's ``mlp``; a ValueError where the row has none."""
        paths = self.anatomy.mlp
        modules = tuple(_first(self.layers[layer], (p,)) for p in paths) if paths else ()
        if not modules or any(m is None for m in modules):
            raise ValueError(
                f"the {self.flavour} tower's blocks ({type(self.layers[layer]).__name__}) have no known MLP branch "
                f"to merge tokens in (anatomy row {self.flavour!r}: mlp={paths})"
            )
        return modules

    def attention_bias(self) -> tuple[str, int, str]:
        """(argument name, position, layout) by which a block takes an additive attention mask
        (the anatomy row's ``attention_bias``); a ValueError where its blocks take none (e.g.
        ``Dinov2Layer`` before transformers 5.2x)."""
        spec = self.anatomy.attention_bias
        block = self.layers[0]
        if spec is None or spec[0] not in inspect.signature(block.forward).parameters:
            raise ValueError(
                f"the {self.flavour} tower's blocks ({type(block).__name__}) take no attention mask, so no "
                "attention bias (proportional attention) can reach them"
            )
        return spec

    def bias_mask(self, bias: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
        """A per-key additive bias ``[B, T]`` as the mask a block takes (:meth:`attention_bias`)."""
        if layout == "keys":
            return bias[:, None, None, :].to(dtype)
        b, t = bias.shape
        return bias[:, None, None, :].expand(b, self.heads, t, t).reshape(b * self.heads, t, t).to(dtype)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, H * d]`` -> ``[B, H, N, d]``."""
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def fused_qkv(self, layer: int, out: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-head q, k, v from a fused ``qkv`` Linear's output ``[B, N, 3 * H * d]`` (q, k, v one
        after another, then heads, as timm splits it), q and k passed through the block's q/k norms."""
        b, n, _ = out.shape
        q, k, v = out.view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.qk_norms[layer] is not None:
            q, k = self.qk_norms[layer][0](q), self.qk_norms[layer][1](k)
        return {"q": q, "k": k, "v": v}

    def mha_qkv(self, mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """Per-head q, k, v that ``mha`` is about to compute from its inputs (``in_proj_weight``
        and ``in_proj_bias``; ``batch_first`` or sequence first)."""
        weights = mha.in_proj_weight.chunk(3)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        out = {}
        for at, (key, name) in enumerate(zip("qkv", ("query", "key", "value"))):
            x = read_arg(args, kwargs, name, at)
            x = x if mha.batch_first else x.transpose(0, 1)
            out[key] = self.split_heads(F.linear(x, weights[at], biases[at]))
        return out


class EncoderCapture:
    """Per-forward store of the encoder q/k/v (and which tokens were alive) at chosen layers."""

    def __init__(self):
        self.qkv: dict[int, dict[str, torch.Tensor]] = {}
        self.alive: dict[int, torch.Tensor] = {}

    def clear(self):
        self.qkv.clear()
        self.alive.clear()


def install_capture(
    installed: Installed,
    tower: VisionTower,
    layers: tuple[int, ...],
    store: Callable[[], EncoderCapture],
    alive: Callable[[], torch.Tensor],
) -> None:
    """Hooks that keep the per-head q, k, v ``[B, H, T, d]`` of the blocks ``layers`` (all ``T``
    tokens, prefix first) for one forward in ``store()`` (the runtime's current store), with the
    raster indices ``alive()`` of the patches there: forward hooks on separate q/k/v Linears or
    on a fused ``qkv`` Linear (split), a forward pre-hook on ``nn.MultiheadAttention`` (q/k/v
    computed from its inputs and ``in_proj`` weights)."""
    kind = tower.anatomy.attention
    for layer in layers:

        def keep(found: dict[str, torch.Tensor], layer=layer):
            current = store()
            current.qkv.setdefault(layer, {}).update(found)
            if "q" in found:
                current.alive[layer] = alive()

        modules = tower.attention[layer]
        if kind == "separate":
            for key, proj in zip("qkv", modules):

                def hook(module, args, output, key=key, keep=keep):
                    keep({key: tower.split_heads(output)})

                installed.hook(proj.register_forward_hook(hook))
        elif kind == "fused":

            def fused(module, args, output, layer=layer, keep=keep):
                keep(tower.fused_qkv(layer, output))

            installed.hook(modules[0].register_forward_hook(fused))
        else:

            def mha(module, args, kwargs, keep=keep):
                keep(tower.mha_qkv(module, args, kwargs))

            installed.hook(modules[0].register_forward_pre_hook(mha, with_kwargs=True))


def encoder_signals(tower: VisionTower, store: EncoderCapture, token_index: torch.Tensor, default_layer: int) -> dict:
    """Signal providers aligned with the current tokens (``token_index``: their raster indices),
    the CLS token first where a tensor includes it. Other prefix tokens (registers, a
    distillation token) take part in each softmax but are not returned."""
    off = tower.prefix

    def positions(layer: int) -> torch.Tensor:
        if layer not in store.qkv:
            raise KeyError(
                f"encoder layer {layer} was not captured; captured: {sorted(store.qkv)}. "
                "Declare it in the method's capture_layers()."
            )
        alive = store.alive[layer]  # [B, N_l] raster indices alive at that layer
        match = alive.unsqueeze(1) == token_index.unsqueeze(2)  # [B, N_cur, N_l]
        pos = match.float().argmax(-1) + off
        if tower.has_cls:
            pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        return pos

    def qkv(layer: int | None = None):
        layer = default_layer if layer is None else layer
        pos = positions(layer)
        idx = pos[:, None, :, None]
        out = []
        for key in "qkv":
            t = store.qkv[layer][key]
            out.append(t.gather(2, idx.expand(-1, t.shape[1], -1, t.shape[-1])))
        return tuple(out)

    def cls_attention(layer: int | None = None, reduce: str = "mean"):
        if not tower.has_cls:
            raise ValueError(f"the {tower.model_type} vision tower has no CLS token, so no CLS attention")
        layer = default_layer if layer is None else layer
        q = store.qkv[layer]["q"][:, :, :1]
        probs = attention_rows(q, store.qkv[layer]["k"], tower.head_dim**-0.5)[:, :, 0]  # [B, H, 1+N_l]
        probs = probs.gather(2, positions(layer)[:, None, 1:].expand(-1, probs.shape[1], -1))
        if reduce == "mean":
            return probs.mean(1)
        if reduce == "sum":
            return probs.sum(1)
        if reduce == "none":
            return probs
        raise ValueError(f"reduce must be one of 'mean', 'sum', 'none', got {reduce!r}")

    def encoder_attention(layer: int | None = None):
        """Full attention probabilities ``[B, H, T, T]`` at ``layer`` over all tokens alive there,
        restricted to the current tokens (CLS first when present)."""
        layer = default_layer if layer is None else layer
        q, k = store.qkv[layer]["q"], store.qkv[layer]["k"]
        probs = attention_rows(q, k, tower.head_dim**-0.5)
        pos = positions(layer)
        h = probs.shape[1]
        probs = probs.gather(2, pos[:, None, :, None].expand(-1, h, -1, probs.shape[-1]))
        return probs.gather(3, pos[:, None, None, :].expand(-1, h, probs.shape[2], -1))

    return {"cls_attention": cls_attention, "encoder_qkv": qkv, "encoder_attention": encoder_attention}


def install_encoder_pruning(
    installed: Installed, tower: VisionTower, layer: int, prune: Callable[[int, torch.Tensor], torch.Tensor]
) -> None:
    """Pre-hook before block ``layer`` (``layer == depth``: before the tower's final norm):
    ``prune(layer, hidden)`` returns the shortened hidden states."""
    if layer == tower.depth and tower.final_norm is None:
        raise ValueError(f"the {tower.flavour} tower has no norm after its last block to prune before")
    module = tower.layers[layer] if layer < tower.depth else tower.final_norm

    def pre_hook(module, args, kwargs):
        hidden = read_arg(args, kwargs, "hidden_states", 0)
        mask = read_arg(args, kwargs, "attention_mask", 1)
        if mask is not None:
            raise NotImplementedError("encoder-stage pruning with an encoder attention mask is not supported")
        return write_arg(args, kwargs, "hidden_states", prune(layer, hidden), 0)

    installed.hook(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
