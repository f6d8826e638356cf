"""A Vision Mamba (Vim) image classifier on ``mambapy``'s bidirectional blocks (issue 15), and the
loader of the embedded Vim trained here (``assets/embedded_vim``).

:class:`VimClassifier` is Vim's ``VisionMamba`` in the form its "middle class token" models have
(``vim_*_midclstok``, Zhu et al. 2024, arXiv 2401.09417): a Conv2d patch embedding, a learned class
token inserted in the *middle* of the raster sequence (``use_middle_cls_token``), a learned
absolute position embedding over patches + class token, ``mambapy.vim.VMamba`` blocks
(``x + VMambaBlock(RMSNorm(x))``, forward and backward scans, outputs averaged:
``bidirectional=True, divide_output=True``), a final RMSNorm and a linear head on the class token.

How a real Vim checkpoint maps onto it (names of hustvl/Vim's ``models_mamba.py``): ``patch_embed.proj``
-> ``patch_embed``; ``cls_token``, ``pos_embed``, ``head`` as they are; ``layers.i.norm`` ->
``backbone.layers.i.norm``; ``layers.i.mixer.{in_proj, conv1d, x_proj, dt_proj, A_log, D,
out_proj}`` -> ``backbone.layers.i.mixer.*`` and the backward branch ``conv1d_b, x_proj_b,
dt_proj_b, D_b`` likewise, ``A_b_log`` -> ``A_log_b``; ``norm_f`` -> ``norm_f``. Vim carries two
streams (``hidden_states``, ``residual``) with a fused add + norm; their sum is this model's single
stream, so the blocks compute the same function. Vim-S: ``d_model=384, depth=24, patch_size=16,
image_size=224`` (196 patches + class token at 98), ``d_state=16``, expand 2 (mambapy's defaults).
PlainMamba has no class token and scans 2-D zig-zag paths: it does not load into this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

#: where the embedded Vim's weights and config live (``vlmprune.embedded.vim_training``)
ASSETS = Path(__file__).resolve().parents[2] / "assets" / "embedded_vim"
WEIGHTS = "vim_easyvqa.safetensors"
CONFIG = "config.json"


@dataclass
class VimConfig:
    """The classifier's shape. ``cls_position``: where the class token is inserted among the
    ``M`` patches, ``None`` for the middle (``M // 2``, Vim's ``use_middle_cls_token``) or an index
    in ``[0, M]``. ``model_type`` names the family (the adapter matches by class)."""

    image_size: int = 64
    patch_size: int = 8
    channels: int = 3
    d_model: int = 64
    depth: int = 6
    d_state: int = 16
    num_classes: int = 24
    cls_position: int | None = None
    model_type: str = "vim"

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ClassTokenPool(nn.Module):
    """Reads the class token of each row: ``x[i, index[i]]`` (``index [B]``), so a caller that moves
    the class token (the Vim adapter, as tokens leave) passes each row's position."""

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x[torch.arange(x.shape[0], device=x.device), index.to(x.device)]


class VimClassifier(nn.Module):
    """Vim with a middle class token (module docstring); ``forward(pixel_values) -> logits``."""

    def __init__(self, config: VimConfig | None = None, **kwargs):
        super().__init__()
        from mambapy.vim import MambaConfig, RMSNorm, VMamba

        config = config or VimConfig(**kwargs)
        m = config.n_patches
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} must be a multiple of patch_size {config.patch_size}")
        if config.cls_position is not None and not 0 <= config.cls_position <= m:
            raise ValueError(f"cls_position must be None (the middle) or in [0, {m}], got {config.cls_position!r}")
        self.config = config
        self.patch_embed = nn.Conv2d(config.channels, config.d_model, config.patch_size, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, m + 1, config.d_model))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        mamba = MambaConfig(config.d_model, config.depth, d_state=config.d_state, bidirectional=True, divide_output=True)
        self.backbone = VMamba(mamba)
        self.norm_f = RMSNorm(config.d_model, mamba.rms_norm_eps)
        self.pool = ClassTokenPool()
        self.head = nn.Linear(config.d_model, config.num_classes)

    @property
    def cls_index(self) -> int:
        """The class token's position in the input sequence (patches + class token)."""
        c = self.config
        return c.n_patches // 2 if c.cls_position is None else c.cls_position

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, M + 1, D]``: the patches in raster order with the class token at :attr:`cls_index`,
        position embedding added."""
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        p = self.cls_index
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :p], cls, x[:, p:]], dim=1) + self.pos_embed

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.backbone(self.embed(pixel_values))
        index = torch.full((x.shape[0],), self.cls_index, dtype=torch.long, device=x.device)
        return self.head(self.pool(self.norm_f(x), index))


def load_vim(path: str | Path | None = None) -> VimClassifier:
    """The embedded Vim (``assets/embedded_vim``, or the directory ``path``) in eval mode: trained
    here on easyvqa-cls (colour x shape, :func:`label_of`)."""
    from safetensors.torch import load_file

    root = Path(path) if path is not None else ASSETS
    config = VimConfig(**json.loads((root / CONFIG).read_text()))
    model = VimClassifier(config)
    model.load_state_dict(load_file(str(root / WEIGHTS)))
    return model.eval()


def save_vim(model: VimClassifier, root: Path) -> None:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    (root / CONFIG).write_text(json.dumps(asdict(model.config), indent=1) + "\n")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(root / WEIGHTS))


def label_of(colour: torch.Tensor, shape: torch.Tensor, n_shapes: int = 3) -> torch.Tensor:
    """The classifier's class of an easyvqa-cls image: ``colour * n_shapes + shape``."""
    return colour * n_shapes + shape
