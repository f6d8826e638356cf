"""What the calibration and training commands share (issue 13, "Rooms"): one helper each, and
the same behaviour through every command that uses it."""

from __future__ import annotations

import json

import pytest
import torch

import vlmprune.embedded
from vlmprune.tools import _common, calibrate_adatoken3d, calibrate_vflowopt


@pytest.mark.parametrize("command", [calibrate_vflowopt, calibrate_adatoken3d], ids=["vflowopt", "adatoken3d"])
def test_calibration_refuses_missing_embedded_model(command, tmp_path, monkeypatch, capsys):
    """``--model embedded`` before the model is built: one line on stderr and status 2 from
    both commands (calibrate_vflowopt raised FileNotFoundError before they shared the loader)."""
    monkeypatch.setattr(vlmprune.embedded, "embedded_path", lambda: tmp_path / "not-built")
    out = tmp_path / "out.json"
    assert command.main(["--model", "embedded", "--samples", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model embedded: the embedded VLM is not built yet") and err.endswith("use --model tiny\n")
    assert not out.exists()


def test_calibration_model_argument_and_loader():
    parser = calibrate_vflowopt.build_parser()
    args = parser.parse_args(["--model", "tiny", "--samples", "3", "--batch-size", "2", "--out", "x.json"])
    model, batches = _common.model_and_batches(args)
    assert [b["input_ids"].shape for b in batches] == [(2, 265), (1, 265)]  # <s> + 256 image tokens + 8 text
    assert model.config.text_config.num_hidden_layers == 4
    with pytest.raises(SystemExit):
        calibrate_adatoken3d.build_parser().parse_args(["--model", "large", "--out", "x.json"])


def test_write_json(tmp_path):
    out = _common.write_json(tmp_path / "a" / "b.json", {"method": "x", "layers": [1, 2]})
    assert out == tmp_path / "a" / "b.json"
    assert out.read_text() == '{\n  "method": "x",\n  "layers": [\n    1,\n    2\n  ]\n}\n'
    assert json.loads(out.read_text()) == {"method": "x", "layers": [1, 2]}


# ================================================================ the training commands' harness
def test_training_commands_share_run_options():
    from vlmprune.tools import train_atp, train_covipal

    for command, weights in ((train_atp, "atp_embedded.safetensors"), (train_covipal, "covipal_embedded.safetensors")):
        parser = command.build_parser()
        args = vars(parser.parse_args([]))
        assert {k: args[k] for k in ("model", "cache_dir", "out", "seed", "threads")} == {
            "model": None, "cache_dir": None, "out": None, "seed": 0, "threads": 2}
        assert f"weights file (default: assets/{weights})" in " ".join(parser.format_help().split())


def test_training_commands_model_option(tmp_path, capsys):
    """--model picks the frozen LVLM; any but the base model needs --out (the default file is the base model's)."""
    from vlmprune.embedded import harness, model

    assert harness.model_path(None) == harness.model_path("base") == model.embedded_path("base")
    assert harness.model_path("deep") == model.embedded_path("deep")
    assert harness.model_path(str(tmp_path)) == tmp_path
    assert harness.start_run(None, 1, 0, "deep", None) is None
    assert "--out is required with --model" in capsys.readouterr().err
    assert harness.start_run(None, 1, 0, str(tmp_path), None) is None


def test_training_record_and_save(tmp_path, monkeypatch):
    from vlmprune.embedded import harness, model
    from vlmprune.methods.atp import ThresholdHeads
    from vlmprune.tools import train_atp

    parser = train_atp.build_parser()
    args = parser.parse_args(["--steps", "3", "--seed", "1"])
    record = harness.training_record(parser, ["--steps", "3", "--seed", "1"], args, lambda: 12.345, schedule=[[1, 0.5, 2]], heldout={"a": 1})
    assert list(record) == ["command", "args", "schedule", "heldout", "wall_time_s"]
    assert record["command"] == "python -m vlmprune.tools.train_atp --steps 3 --seed 1"
    assert record["args"]["steps"] == 3 and record["args"]["seed"] == 1 and record["wall_time_s"] == 12.3
    heads = ThresholdHeads([1, 2], hidden=4, tau=5.0)
    monkeypatch.setattr(model, "embedded_path", lambda: tmp_path / "assets" / "embedded_vlm")
    path = harness.save_trained(heads, None, "atp_embedded.safetensors", record, lambda: 0.0)
    assert path == tmp_path / "assets" / "atp_embedded.safetensors"
    loaded = ThresholdHeads.load(path)
    assert loaded.training_info == record
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), heads.state_dict().values(), strict=True))
    assert harness.save_trained(heads, str(tmp_path / "x" / "h.safetensors"), "unused", record, lambda: 0.0).is_file()


def _tiny_batch(b: int = 2, text: int = 5):
    """A :class:`~vlmprune.embedded.harness.Batch` for ``tests.tiny.tiny_llava`` (256 image tokens,
    vision width 32), one question per row, no padding."""
    from vlmprune.embedded import harness

    gen = torch.Generator().manual_seed(0)
    n = harness.N_IMAGE_TOKENS
    ids = torch.cat([torch.ones(b, 1, dtype=torch.long), torch.full((b, n), 3), torch.randint(4, 96, (b, text), generator=gen)], 1)
    length = ids.shape[1]
    return harness.Batch(
        ids=ids, allowed=torch.ones(length, length, dtype=torch.bool).tril().expand(b, -1, -1),
        pos=torch.arange(length).expand(b, -1), feats=torch.randn(b, n, 32, generator=gen),
        query=(torch.arange(b), torch.full((b,), length - 1)), answers=torch.zeros(b, dtype=torch.long), visual=slice(1, 1 + n),
    )


def test_frozen_lm_on_a_batch_record():
    """The harness's layer-by-layer LLM on a :class:`Batch` equals the model's own forward (also on
    eager attention, where :meth:`FrozenLM.check` passed a bool mask that masked nothing), and a
    hard key mask from layer 0 equals removing those visual tokens (original positions)."""
    from tests.tiny import tiny_llava
    from vlmprune.embedded import harness

    lm = harness.FrozenLM(tiny_llava(attn="eager"))
    batch = _tiny_batch()
    assert lm.check(batch) < 1e-4
    keep = torch.zeros(2, harness.N_IMAGE_TOKENS, dtype=torch.bool)
    keep[:, ::5] = True
    masked, _ = lm.run(batch, at_layer=lambda i, probs, hidden: harness.hard_key_mask(batch, keep) if i == 0 else None)
    cols = torch.cat([torch.tensor([0]), 1 + keep[0].nonzero().flatten(), torch.arange(1 + harness.N_IMAGE_TOKENS, batch.ids.shape[1])])
    x = lm.embed(batch)[:, cols]  # the visual tokens removed by hand, the others at their positions
    # an explicit causal mask: without one, transformers reads the gaps in the positions as packed sequences
    causal = torch.full((cols.numel(), cols.numel()), float("-inf")).triu(1).expand(2, 1, -1, -1)
    out = lm.lm(inputs_embeds=x, attention_mask=causal, position_ids=batch.pos[:, cols], use_cache=False)
    torch.testing.assert_close(masked, lm.head(out.last_hidden_state[:, -1]), atol=1e-4, rtol=1e-4)


def test_atp_soft_step_on_a_batch_record():
    """One soft-masked training step of ``train_atp`` on the harness: the answer logits and a
    soft kept fraction in (0, 1) per row, with gradients reaching the threshold heads only."""
    from tests.tiny import tiny_llava
    from vlmprune.embedded import harness
    from vlmprune.methods.atp import ThresholdHeads
    from vlmprune.tools import train_atp

    lm = harness.FrozenLM(tiny_llava(attn="eager"))
    schedule = [(1, 0.5, 2), (2, 0.5, 4)]
    heads = ThresholdHeads([1, 2], hidden=4, tau=20.0)
    logits, frac = train_atp.soft_step(lm, heads, _tiny_batch(), schedule, 0.25, 0.5)
    assert logits.shape == (2, 96) and frac.shape == (2,) and bool(((frac > 0) & (frac < 1)).all())
    (logits.logsumexp(-1).sum() + frac.sum()).backward()
    assert all(p.grad is not None for p in heads.parameters())
    assert all(p.grad is None for p in lm.model.parameters())
