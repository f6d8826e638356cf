"""The realism check of the offline benchmark (issue 20): rank correlation and relative scores."""

import json
import math

import pytest
from vlmprune.eval import realism


def test_spearman_planted_orders_and_ties():
    assert realism.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert realism.spearman([3, 2, 1], [10, 20, 30]) == pytest.approx(-1.0)
    assert realism.spearman([1, 3, 2], [10, 20, 30]) == pytest.approx(0.5)
    # a tie: ranks (1.5, 1.5, 3) against (1, 2, 3)
    assert realism.spearman([5, 5, 9], [1, 2, 3]) == pytest.approx(0.8660254, abs=1e-6)
    assert math.isnan(realism.spearman([4, 4, 4], [1, 2, 3]))
    with pytest.raises(ValueError, match="equal-length"):
        realism.spearman([1, 2], [1, 2, 3])


def test_published_order_is_visionzip_sparsevlm_fastv_at_every_budget():
    for tokens in (192, 128, 64):
        fv, sv, vz = (realism.published_relative(tokens, m) for m in realism.COMPARED)
        assert fv < sv < vz
    # GQA alone at 64 tokens: 46.1 / 61.9
    assert realism.PUBLISHED[64]["fastv"][0] / realism.PUBLISHED_FULL[0] == pytest.approx(0.7447, abs=1e-4)


def rows_for(accuracies: dict, full: dict) -> list[dict]:
    rows = [{"task": t, "method": "none", "budget": 1.0, "accuracy": a} for t, a in full.items()]
    for (task, method, budget), acc in accuracies.items():
        rows.append({"task": task, "method": method, "budget": budget, "accuracy": acc})
    return rows


def planted(order_on_b: dict) -> list[dict]:
    """fastv / sparsevlm / visionzip at the three budgets on two tasks with the given accuracies."""
    acc = {}
    for budget in (0.333, 0.222, 0.111):
        for task in ("a", "b"):
            for m, v in zip(realism.COMPARED, order_on_b[budget]):
                acc[(task, m, budget)] = v
    return rows_for(acc, {"a": 0.8, "b": 0.5})


def test_realism_reads_the_order_per_budget_and_task():
    rows = planted({0.333: (0.4, 0.3, 0.2), 0.222: (0.2, 0.3, 0.4), 0.111: (0.3, 0.2, 0.4)})
    check = realism.realism(rows)
    assert check[192]["spearman"] == {"a": pytest.approx(-1.0), "b": pytest.approx(-1.0), "mean": pytest.approx(-1.0)}
    assert check[128]["spearman"]["mean"] == pytest.approx(1.0)
    assert check[64]["spearman"]["a"] == pytest.approx(0.5)
    # relative to each task's own full accuracy: 0.4 / 0.8 and 0.4 / 0.5
    assert check[128]["embedded"]["a"]["visionzip"] == pytest.approx(0.5)
    assert check[128]["embedded"]["b"]["visionzip"] == pytest.approx(0.8)
    assert check[128]["embedded"]["mean"]["visionzip"] == pytest.approx(0.65)


def test_missing_method_gives_no_correlation():
    rows = [r for r in planted({b: (0.4, 0.3, 0.2) for b in (0.333, 0.222, 0.111)}) if r["method"] != "sparsevlm"]
    assert realism.realism(rows)[64]["spearman"] == {"a": None, "b": None, "mean": None}


def test_command_prints_tables_and_writes_plot(tmp_path, capsys):
    folder = tmp_path / "bench"
    folder.mkdir()
    rows = planted({b: (0.2, 0.3, 0.4) for b in (0.333, 0.222, 0.111)})
    (folder / "results.json").write_text(json.dumps({"config": {"model": "planted"}, "rows": rows}))
    assert realism.main([str(folder), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    # fastv (0.2/0.8 + 0.2/0.5) / 2 = 32.5 %, visionzip (0.4/0.8 + 0.4/0.5) / 2 = 65 %
    line = next(t for t in text.splitlines() if t.startswith("| | planted: mean |"))
    assert line.startswith("| | planted: mean | 32.5 | ") and line.endswith(" | 65.0 | +1.00 |")
    assert "| `visionzip` | 65.0 | 65.0 | 65.0 |" in text
    assert (tmp_path / "out" / "realism.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="--labels"):
        realism.main([str(folder), "--labels", "x,y"])
    with pytest.raises(SystemExit, match="no results.json"):
        realism.main([str(tmp_path / "nothing")])


def test_readme_realism_table_is_the_committed_results():
    """The README's realism table is what the committed command prints from the committed results."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    results = []
    for folder, label, stand_ins in (("benchmark_vlm16", "16-layer", None),
                                     ("benchmark_vlm16", "16-layer FastV K=1", {"fastv": "fastv[k_layer=1]"}),
                                     ("benchmark", "4-layer", None)):
        data = realism.load_results(root / "assets" / folder)
        data["label"], data["stand_ins"] = label, stand_ins
        results.append(data)
    assert realism.realism_table(results) in (root / "README.md").read_text()


def test_stand_in_rows():
    rows = planted({b: (0.4, 0.3, 0.2) for b in (0.333, 0.222, 0.111)})
    rows += [{**r, "method": "fastv[k_layer=1,x=2]", "accuracy": 0.01} for r in rows if r["method"] == "fastv"]
    assert realism.realism(rows)[64]["spearman"]["mean"] == pytest.approx(-1.0)
    stand_in = realism.parse_stand_ins("fastv=fastv[k_layer=1,x=2]")
    assert stand_in == {"fastv": "fastv[k_layer=1,x=2]"}
    # the stand-in FastV is now the weakest: fastv < visionzip < sparsevlm against published fastv < sparsevlm < visionzip
    assert realism.realism(rows, stand_in)[64]["spearman"]["mean"] == pytest.approx(0.5)
    for bad in ("fastv", "tome=tome", "fastv="):
        with pytest.raises(SystemExit, match="METHOD=ROW"):
            realism.parse_stand_ins(bad)
