"""The command line: `methods`, `run` (tiny fallback without the embedded model), `bench`."""

from __future__ import annotations

import json
import re
import time

import pytest

from vlmprune import cli


def test_methods_lists_the_registry(capsys):
    cli.main(["methods"])
    out = capsys.readouterr().out
    for name in ("fastv", "visionzip", "divprune", "prumerge_plus", "random", "uniform"):
        assert any(line.split()[0] == name for line in out.splitlines()[1:] if line.strip())
    cli.main(["methods", "fast*", "--json"])
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["fastv"]


def test_methods_table_is_readable(capsys):
    """Whole paper titles, a trained-weights column in words (not a bare True/False 'free'), and
    the way to see options said in the table and in --help."""
    import vlmprune

    cli.main(["methods"])
    out = capsys.readouterr().out
    header, *lines = out.splitlines()
    assert header.split()[:3] == ["name", "stages", "reads"] and "free" not in header
    rows = {line.split()[0]: line for line in lines if line.strip() and line.split()[0] in {m["name"] for m in vlmprune.methods()}}
    for m in vlmprune.methods():
        assert m["paper"]["title"] in rows[m["name"]]  # never cut short
    assert rows["covipal"].split()[3] == "required" and rows["atp"].split()[3] == "optional"
    assert rows["fastv"].split()[3] == "-"
    assert "vlmprune methods NAME --json" in out
    with pytest.raises(SystemExit):
        cli.main(["methods", "--help"])
    assert "options" in capsys.readouterr().out.split("--json")[-1]


def test_run_without_embedded_model_uses_a_tiny_model_and_says_so(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda path: (None, None, None))
    cli.main(["run", "--method", "divprune", "--budget", "64", "--max-new-tokens", "2", "--repeats", "1", "--json"])
    captured = capsys.readouterr()
    assert "random weights" in captured.err
    report = json.loads(captured.out)  # stdout is the JSON alone
    assert report["visual_tokens"] == {"before": [576], "llm": [64], "after_last_point": [64]}
    assert report["llm_prefill_flops_ratio"] < 1 and len(report["answer_pruned"]) == 2
    assert report["timing"] == "median of 1 generate() calls of 2 new tokens after one warm-up"


def test_run_prints_a_short_summary_by_default(capsys, monkeypatch):
    """A person gets a table: tokens with their share, FLOPs and KV bytes in %, KiB / MiB."""
    monkeypatch.setattr(cli, "_load", lambda path: (None, None, None))
    cli.main(["run", "--method", "fastv", "--budget", "64", "--max-new-tokens", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "{" not in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["all"], ["fastv"])}
    assert "576" in rows["all"] and "100 %" in rows["all"] and re.search(r"\d+\.\d (KiB|MiB)", rows["all"])
    assert "576 -> 64 (11.1 %)" in rows["fastv"]  # FastV: all enter the LLM, 64 after layer K
    assert re.search(r"\d+\.\d (KiB|MiB) \(\d+\.\d %\)", rows["fastv"])
    assert "after one warm-up" in out and "vlmprune bench" in out


def test_timed_warms_up_then_takes_the_median():
    calls = []

    def call():
        calls.append(None)
        time.sleep(0.3 if len(calls) == 1 else 0.0)  # a slow first (cold) call
        return len(calls)

    result, seconds = cli._timed(call, 3)
    assert len(calls) == 4 and result == 4 and seconds < 0.1


@pytest.mark.parametrize("argv, message", [
    (["--method", "vizionzip"], r"^vlmprune run: --method: unknown method 'vizionzip'; valid choices: \[.*'visionzip'"),
    (["--budget", "300"], r"^vlmprune run: --budget: budget must be in \[1, 256\] tokens per image"),
    (["--budget", "0"], r"^vlmprune run: --budget: budget must be in \[1, 256\]"),
    (["--budget", "1.5"], r"^vlmprune run: --budget: budget as a fraction must be in \(0, 1\]"),
    (["--image", "/no/such.png", "--question", "what?"], r"^vlmprune run: --image: no such file"),
    (["--image", "/no/such.png"], r"^vlmprune run: --image needs --question"),
])
def test_run_checks_arguments_before_loading_a_model(monkeypatch, argv, message):
    """An unknown method or a budget above the embedded model's 256 tokens: one line, exit 1,
    before any model loads (they came as tracebacks after the model had answered)."""
    def no_model(path):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load", no_model)
    monkeypatch.setattr(cli, "_embedded_visual_tokens", lambda: 256)
    with pytest.raises(SystemExit, match=message) as exc:
        cli.main(["run", *argv])
    assert "\n" not in str(exc.value.code)


def test_run_checks_the_model_before_generating(monkeypatch):
    """Once a model is loaded, a method it cannot serve is one line, before any generate()."""
    from types import SimpleNamespace

    from tests.tiny import tiny_llava

    model = tiny_llava("siglip")
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("generate() ran"))
    with pytest.raises(SystemExit, match=r"^vlmprune run: --method visionzip: .*CLS"):
        cli._serves(model, SimpleNamespace(method="visionzip", budget=8), 64)
    with pytest.raises(SystemExit, match=r"^vlmprune run: --budget: budget must be in \[1, 64\]"):
        cli._serves(model, SimpleNamespace(method="uniform", budget=65), 64)


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


@pytest.mark.parametrize("argv, message", [
    (["--methods", "uniform,nosuch"], r"^vlmprune bench: --methods: unknown method 'nosuch'; valid choices"),
    (["--batch", "1,x"], r"^vlmprune bench: --batch must be comma-separated integers"),
    (["--repeats", "0"], r"^vlmprune bench: --repeats and --batch must be >= 1"),
])
def test_bench_checks_arguments_before_building_a_model(monkeypatch, argv, message):
    from vlmprune.tools import bench

    monkeypatch.setattr(bench, "run", lambda **kwargs: pytest.fail("a model was built"))
    with pytest.raises(SystemExit, match=message):
        cli.main(["bench", *argv])
