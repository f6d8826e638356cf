"""Vision-encoder mechanics shared by adapters: finding layers, capturing q/k/v, pruning
between encoder layers, and the encoder signals (CLS attention computed from q and k)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from vlmprune.primitives.scoring import attention_rows

from .base import Installed, read_arg, write_arg

#: vision towers without a CLS token
CLS_FREE = {"siglip_vision_model", "siglip2_vision_model", "siglip", "siglip2"}


class VisionTower:
    """Anatomy of a ViT-style tower: its block list, each block's q/k/v projections, heads, CLS."""

    def __init__(self, tower: nn.Module):
        self.tower = tower
        config = tower.config
        self.model_type = getattr(config, "model_type", "")
        self.has_cls = self.model_type not in CLS_FREE
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.layers = _find_blocks(tower)
        self.projections = [_qkv_of(block) for block in self.layers]

    @property
    def depth(self) -> int:
        return len(self.layers)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)


def _find_blocks(tower: nn.Module) -> nn.ModuleList:
    best = None
    for module in tower.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(_has_qkv(m) for m in module):
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise ValueError(f"cannot find the encoder blocks (with q/k/v projections) of {type(tower).__name__}")
    return best


def _has_qkv(block: nn.Module) -> bool:
    try:
        _qkv_of(block)
        return True
    except LookupError:
        return False


def _qkv_of(block: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    found: dict[str, nn.Module] = {}
    for name, module in block.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        for key, names in (("q", ("q_proj", "query")), ("k", ("k_proj", "key")), ("v", ("v_proj", "value"))):
            if leaf in names and isinstance(module, nn.Linear):
                found.setdefault(key, module)
    if len(found) != 3:
        raise LookupError("no q/k/v projections")
    return found["q"], found["k"], found["v"]


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
    """Forward hooks on q/k/v projections of ``layers`` that keep their outputs for one forward
    in ``store()`` (the runtime's current store)."""
    for layer in layers:
        for key, proj in zip("qkv", tower.projections[layer]):

            def hook(module, args, output, layer=layer, key=key):
                current = store()
                current.qkv.setdefault(layer, {})[key] = tower.split_heads(output)
                if key == "q":
                    current.alive[layer] = alive()

            installed.hook(proj.register_forward_hook(hook))


def encoder_signals(tower: VisionTower, store: EncoderCapture, token_index: torch.Tensor, default_layer: int) -> dict:
    """Signal providers aligned with the current tokens (``token_index``: their raster indices)."""
    off = int(tower.has_cls)

    def positions(layer: int) -> torch.Tensor:
        if layer not in store.qkv:
            raise KeyError(
                f"encoder layer {layer} was not captured; captured: {sorted(store.qkv)}. "
                "Declare it in the method's capture_layers()."
            )
        alive = store.alive[layer]  # [B, N_l] raster indices alive at that layer
        match = alive.unsqueeze(1) == token_index.unsqueeze(2)  # [B, N_cur, N_l]
        pos = match.float().argmax(-1) + off
        if off:
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
    """Pre-hook before block ``layer``: ``prune(layer, hidden)`` returns the shortened hidden states."""

    def pre_hook(module, args, kwargs):
        hidden = read_arg(args, kwargs, "hidden_states", 0)
        mask = read_arg(args, kwargs, "attention_mask", 1)
        if mask is not None:
            raise NotImplementedError("encoder-stage pruning with an encoder attention mask is not supported")
        return write_arg(args, kwargs, "hidden_states", prune(layer, hidden), 0)

    installed.hook(tower.layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True))
