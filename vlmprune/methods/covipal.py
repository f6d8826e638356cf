"""CoViPAL: a small trained Plug-and-Play Pruning Module (PPM) scores visual tokens with the prompt
as context, before the LLM sees them."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..context import Selection, TokenContext
from ..method import Method
from ..primitives.selection import topk_keep_order
from ..registry import register
from ..weights import build_module, load_module, save_module

#: what a PPM weights file records in its safetensors metadata
WEIGHTS_FORMAT = "vlmprune-covipal-ppm-1"
#: the shipped PPM for the embedded model (written by ``python -m vlmprune.tools.train_covipal``)
EMBEDDED_WEIGHTS = "covipal_embedded.safetensors"


class _Block(nn.Module):
    """A pre-norm transformer block (self-attention + GELU MLP) with a key padding mask."""

    def __init__(self, width: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, ff), nn.GELU(), nn.Linear(ff, width))

    def forward(self, x: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_ok[:, None, None, :])
        x = x + self.out(att.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class PPM(nn.Module):
    """The Plug-and-Play Pruning Module (a reconstruction; the paper's exact architecture is
    [unverified]): LayerNorm + linear projection of the visual tokens and of the prompt's text
    embeddings (both in LLM space, width ``dim``) to ``width``, a learned type embedding per
    modality, ``blocks`` light transformer blocks over ``[visual; text]`` (text padding
    masked), and a linear head giving one logit per visual token. No position embedding: the
    visual tokens carry the vision tower's positions already, and the module stays independent
    of the grid ("plug and play")."""

    def __init__(self, dim: int, width: int = 128, heads: int = 4, blocks: int = 1, ff: int = 256, seed: int | None = None):
        super().__init__()
        if width % heads:
            raise ValueError(f"PPM width {width} must be a multiple of heads {heads}")
        self.cfg = {"dim": dim, "width": width, "heads": heads, "blocks": blocks, "ff": ff}
        gen_state = torch.random.get_rng_state() if seed is not None else None
        if seed is not None:
            torch.manual_seed(seed)
        self.norm_v, self.norm_t = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.proj_v, self.proj_t = nn.Linear(dim, width), nn.Linear(dim, width)
        self.modality = nn.Parameter(torch.randn(2, width) * 0.02)
        self.blocks = nn.ModuleList(_Block(width, heads, ff) for _ in range(blocks))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1))
        if gen_state is not None:
            torch.random.set_rng_state(gen_state)
        self.eval()

    def forward(self, visual: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, N]`` for ``visual [B, N, D]`` given ``text [B, T, D]`` (``text_mask [B, T]``,
        True = a real token)."""
        b, n, _ = visual.shape
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        x = torch.cat([self.proj_v(self.norm_v(visual)) + self.modality[0], self.proj_t(self.norm_t(text)) + self.modality[1]], 1)
        key_ok = torch.cat([torch.ones(b, n, dtype=torch.bool, device=x.device), text_mask.bool()], 1)
        for block in self.blocks:
            x = block(x, key_ok)
        return self.head(x[:, :n]).squeeze(-1)

    def save(self, path, extra: dict | None = None) -> None:
        save_module(self, path, fmt=WEIGHTS_FORMAT, method="covipal", config=self.cfg, training=extra)

    @classmethod
    def load(cls, path) -> "PPM":
        return load_module(
            path, lambda cfg: cls(**cfg), fmt=WEIGHTS_FORMAT, method="covipal", kind="a CoViPAL PPM",
            train="python -m vlmprune.tools.train_covipal",
        )

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def file_digest(path) -> str:
    """Short sha256 of a file (identifies the checkpoint a PPM was trained against)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def embedded_weights_path() -> Path:
    from ..embedded import embedded_path

    return embedded_path().parent / EMBEDDED_WEIGHTS


def is_embedded(model) -> bool:
    """Whether ``model`` was loaded from the embedded model's assets (``load_embedded()``), or from
    a copy written by ``materialize_embedded()`` (same ``training.json``)."""
    from ..embedded import embedded_path

    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not name:
        return False
    try:
        here, assets = Path(name).resolve(), embedded_path().resolve()
        if here == assets:
            return True
        record = here / "training.json"
        return record.is_file() and record.read_bytes() == (assets / "training.json").read_bytes()
    except OSError:
        return False


@register
@dataclass
class CoViPAL(Method):
    """CoViPAL (Tang et al., "CoViPAL: Layer-wise Contextualized Visual Token Pruning for Large
    Vision-Language Models", arXiv 2508.17243, Findings of EMNLP 2025; official repo
    tyxqc/CoViPAL not available here, code not read: built from the method card).

    **Inference**: at the projector stage (the input of the LLM), the :class:`PPM` scores each
    visual token from its projected (LLM-space) embedding and the prompt's text embeddings;
    the top ``round(r n_v)`` (the budget) are kept in raster order. Kept tokens keep their
    original position ids (card pitfall 4). No LLM attention is read at inference, so any
    attention kernel works. The budget applies per image.

    **Weights**: ``vlmprune.wrap(model, "covipal", budget=..., weights=path)`` with a file from
    ``python -m vlmprune.tools.train_covipal`` (or a :class:`PPM` instance). Without ``weights=``
    the shipped PPM (``assets/covipal_embedded.safetensors``) is loaded when the model is the
    embedded one (:func:`vlmprune.embedded.load_embedded`); any other model needs weights
    trained for it (a clear error otherwise).

    **Training** (:mod:`vlmprune.tools.train_covipal`, LVLM frozen): stage 1, attention-guided
    distillation: KL from the teacher distribution, the attention a deep LLM layer ``l_g``'s
    text tokens after the image (default; ``--teacher-query last``: the last prompt token) pay
    the visual tokens (head-mean, renormalised over the visual tokens), to ``softmax`` of the
    PPM logits. Stage 2 ([unverified] in the card): optional, LM loss of the pruned model with
    a soft top-k key mask (``--stage2-steps``).
    """

    name = "covipal"
    stages = ("projector",)
    needs = frozenset({"projected", "text_embedding"})
    training_free = False
    accepts_weights = True
    positions = "original"
    paper = {"title": "CoViPAL: Layer-wise Contextualized Visual Token Pruning for Large Vision-Language Models", "arxiv": "2508.17243"}

    def __post_init__(self):
        super().__post_init__()
        self.ppm: PPM | None = None

    def load_weights(self, weights) -> None:
        """``weights``: a path written by ``python -m vlmprune.tools.train_covipal``, a :class:`PPM`, or
        a ``(config, state_dict)`` pair."""
        if isinstance(weights, PPM):
            self.ppm = weights.eval()
        elif isinstance(weights, (str, Path)):
            self.ppm = PPM.load(weights)
        elif isinstance(weights, tuple) and len(weights) == 2 and isinstance(weights[0], dict):
            self.ppm = build_module(lambda cfg: PPM(**cfg), weights[0], weights[1], "parameter 'weights' of method 'covipal'")
        else:
            raise TypeError(
                f"parameter 'weights' of method 'covipal' must be a path, a PPM or a (config, state_dict) pair, "
                f"got {type(weights).__name__}"
            )

    def resolve_weights(self, model) -> None:
        if self.ppm is not None:
            return
        path = embedded_weights_path()
        if is_embedded(model) and path.is_file():
            self.ppm = PPM.load(path)
            trained_on = getattr(self.ppm, "training_info", {}).get("checkpoint_sha256")
            current = Path(model.config._name_or_path) / "model.safetensors"
            if trained_on and current.is_file() and file_digest(current) != trained_on:
                warnings.warn(
                    f"method 'covipal': the shipped PPM {path.name} was trained on another embedded checkpoint "
                    "(sha256 differs); re-run python -m vlmprune.tools.train_covipal",
                    stacklevel=3,
                )
            return
        raise ValueError(
            "method 'covipal' needs a trained PPM: pass wrap(model, 'covipal', budget=..., weights='ppm.safetensors') "
            "(train one with python -m vlmprune.tools.train_covipal); shipped weights exist only for the embedded model "
            f"({'missing: ' + str(path) if is_embedded(model) else 'this is another model'})"
        )

    def scores(self, ctx: TokenContext) -> torch.Tensor:
        if self.ppm is None:
            raise ValueError("method 'covipal' has no PPM weights: pass weights= to vlmprune.wrap (or call load_weights)")
        visual = ctx.signals.projected()
        text, mask = ctx.signals.text_embedding()
        dim = self.ppm.cfg["dim"]
        if visual.shape[-1] != dim:
            raise ValueError(
                f"parameter 'weights' of method 'covipal': the PPM was trained for an LLM of width {dim}, "
                f"this model's is {visual.shape[-1]}"
            )
        dtype = next(self.ppm.parameters()).dtype
        return self.ppm(visual.to(dtype), text.to(visual.device, dtype), mask.to(visual.device)).float()

    def select(self, ctx: TokenContext) -> Selection:
        scores = self.scores(ctx)
        return Selection(keep=topk_keep_order(scores, ctx.budget), scores=scores)


def topk_overlap(pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the fraction of ``target``'s top-``k`` that ``pred``'s top-``k`` recovers."""
    a = torch.zeros_like(pred, dtype=torch.bool).scatter_(1, pred.topk(k, -1).indices, True)
    b = torch.zeros_like(target, dtype=torch.bool).scatter_(1, target.topk(k, -1).indices, True)
    return (a & b).sum(-1).float() / k


def distill_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Stage 1's KL(target || softmax(logits)), ``target`` a distribution over the visual tokens."""
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
    return F.kl_div(F.log_softmax(logits, -1), target, reduction="batchmean")

