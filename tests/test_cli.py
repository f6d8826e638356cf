"""The command line: `methods`, `run` (tiny fallback without the embedded model), `bench`."""

from __future__ import annotations

import json

from vlmprune import cli


def test_methods_lists_the_registry(capsys):
    cli.main(["methods"])
    out = capsys.readouterr().out
    for name in ("fastv", "visionzip", "divprune", "prumerge_plus", "random", "uniform"):
        assert any(line.split()[0] == name for line in out.splitlines()[1:])
    cli.main(["methods", "fast*", "--json"])
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["fastv"]


def test_run_without_embedded_model_uses_a_tiny_model_and_says_so(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda path: (None, None, None))
    cli.main(["run", "--method", "divprune", "--budget", "64", "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert "random weights" in out
    report = json.loads(out[out.index("{") :])
    assert report["visual_tokens"] == {"before": [576], "llm": [64]}
    assert report["llm_prefill_flops_ratio"] < 1 and len(report["answer_pruned"]) == 2


def test_bench_qwen_prints_ratios(capsys):
    cli.main(["bench", "--size", "qwen2-vl-tiny", "--methods", "flowcut", "--repeats", "1", "--device", "cpu", "--llm-layers", "3", "--vision-layers", "2"])
    out = capsys.readouterr().out
    assert "visual tokens/image=576" in out
    lines = [line.split() for line in out.splitlines() if line.split()[:2] == ["1", "flowcut"]]
    assert [row[3] for row in lines] == ["576", "192", "64"]
    # FlowCut: 2 x 64 visual tokens enter the 3-layer LLM, 64 from layer 2 on; 42 text tokens
    assert float(lines[0][-1]) == 1.0 and float(lines[-1][-1]) == round((2 * (128 + 42) + 64 + 42) / (3 * 618), 3)


def test_bench_prints_ratios(capsys):
    cli.main(["bench", "--methods", "uniform", "--repeats", "1", "--device", "cpu"])
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:2] == ["1", "uniform"]]
    assert [row[2] for row in lines] == ["1.000", "0.333", "0.111"]
    assert [row[3] for row in lines] == ["576", "192", "64"]
    assert float(lines[-1][-1]) < 0.2  # KV bytes ratio at 11 % of the visual tokens
