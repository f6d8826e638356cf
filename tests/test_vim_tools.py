"""``python -m vlmprune.tools.eval_vim`` on a tiny random Vim saved like the embedded one, and the
token-blocks count its table reports; the committed embedded Vim's accuracy on a few test images."""

from __future__ import annotations

import json

import pytest
import torch

from vlmprune.embedded import vim_training
from vlmprune.embedded.vim_model import VimClassifier, VimConfig, load_vim, save_vim
from vlmprune.tools import eval_vim

torch.set_num_threads(1)


def test_token_blocks_counts_each_block_on_its_tokens():
    """64 patches, 6 blocks; 32 kept from block 1 on, 16 from block 3 on: (65 + 33 * 2 + 17 * 3) / (65 * 6)."""
    points = [{"point": "mixer:1", "out": [32, 32]}, {"point": "mixer:3", "out": [16, 16]}]
    assert eval_vim.token_blocks(points, 64, 6) == pytest.approx((65 + 33 * 2 + 17 * 3) / (65 * 6))
    assert eval_vim.token_blocks([], 64, 6) == 1.0


def test_eval_rows_and_files(tmp_path):
    """One row per run x budget (x layer for the one-point methods) after the unwrapped one, the
    final counts as budgeted, files written; a batch below 1 is refused."""
    torch.manual_seed(0)
    save_vim(VimClassifier(VimConfig(d_model=8, depth=4, d_state=2)), tmp_path / "w")
    runs = (("top_vim", "top_vim", {}), ("uniform", "uniform", {}), ("tome", "tome", {}))
    rows = eval_vim.evaluate(images=8, batch=4, runs=runs, budgets=(16, 4), layers=(2,), log=lambda r: None, weights=tmp_path / "w")
    assert [(r["method"], r["budget"], r["r"], r["layers"], r["tokens_kept"]) for r in rows] == [
        ("none", None, None, None, 64), ("top_vim", 16, None, [1, 2, 3], 16), ("top_vim", 4, None, [1, 2, 3], 4),
        ("uniform", 16, None, [2], 16), ("uniform", 4, None, [2], 4),
        # ToMe: r=16 gives 64 -> 48 -> 32 -> 16 at the last block; 8 is the fewest (r=32, capped at half each time)
        ("tome", 16, 16, [1, 2, 3, 4], 16), ("tome", 4, 32, [1, 2, 3, 4], 8),
    ]
    assert all(r["images"] == 8 and r["timed_batches"] == 1 and 0 <= r["both"] <= 1 for r in rows)
    assert rows[3]["token_blocks"] == pytest.approx((65 * 2 + 17 * 2) / (65 * 4))
    # per token: in_proj 8 x 32, out_proj 16 x 8, per direction conv 16 x 4, x_proj 16 x 5, dt_proj 1 x 16 and
    # the scan 4 x 16 x 2 = 960 multiply-adds; the patch embedding 64 x (3 x 8 x 8 x 8)
    assert rows[0]["gflops"] == pytest.approx(2 * (64 * 1536 + 960 * 65 * 4) / 1e9)
    assert rows[3]["gflops"] == pytest.approx(2 * (64 * 1536 + 960 * (65 * 2 + 17 * 2)) / 1e9)
    eval_vim.write(rows, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == rows
    assert (tmp_path / "out" / "accuracy_vs_tokens.png").stat().st_size > 0
    with pytest.raises(ValueError, match="batch must be a positive int"):
        eval_vim.evaluate(batch=0)


def test_committed_embedded_vim_classifies_easyvqa():
    """The committed weights (assets/embedded_vim): both labels right on at least 30 of the first 32
    test images (31 of them; 95.6 % of all 954 when trained)."""
    x, y = vim_training.dataset("test", 32)
    with torch.no_grad():
        pred = load_vim()(x).argmax(-1)
    assert int((pred == y).sum()) >= 30


def test_random_flips_move_the_distillation_targets_with_their_images():
    """A planted image whose 8 x 8 patches each hold their own index: after the flips, each patch
    of the image and the target at that patch agree (and some images were flipped)."""
    ids = torch.arange(64.0).view(1, 1, 8, 8)
    x = ids.repeat_interleave(8, 2).repeat_interleave(8, 3).expand(16, 3, 64, 64)
    target = torch.arange(64.0).view(1, 64, 1).expand(16, 64, 2)
    fx, ft = vim_training.random_flips(x, target, torch.Generator().manual_seed(0))
    patch_ids = fx[:, 0, ::8, ::8].flatten(1)
    assert torch.equal(patch_ids, ft[..., 0]) and torch.equal(patch_ids, ft[..., 1])
    flipped = (patch_ids != torch.arange(64.0)).any(1)
    assert 4 <= flipped.sum() <= 12
    assert torch.equal(patch_ids[flipped], torch.arange(64.0).view(8, 8).flip(1).flatten().expand(int(flipped.sum()), 64))
    assert torch.equal(x[:, 0, ::8, ::8].flatten(1), torch.arange(64.0).expand(16, 64))  # inputs untouched


def test_fit_probe_recovers_a_planted_linear_map_of_the_final_patch_tokens():
    from vlmprune.embedded.vim_model import VimClassifier, VimConfig

    torch.manual_seed(0)
    model = VimClassifier(VimConfig(image_size=16, patch_size=8, d_model=8, depth=1, d_state=4, num_classes=2))
    x = torch.randn(6, 3, 16, 16)
    weight, bias = torch.randn(5, 8), torch.randn(5)
    teacher = vim_training.final_patches(model.eval(), x)[1] @ weight.T + bias
    probe = torch.nn.Linear(8, 5)
    vim_training.fit_probe(probe, model, x, teacher)
    assert torch.allclose(probe.weight, weight, atol=1e-3) and torch.allclose(probe.bias, bias, atol=1e-3)
