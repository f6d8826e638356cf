"""What the calibration and training commands share (issue 13, "Rooms"): one helper each, and
the same behaviour through every command that uses it."""

from __future__ import annotations

import json

import pytest

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
