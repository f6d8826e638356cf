"""Does the offline benchmark order methods as a real VLM does? (issue 20)

    python -m vlmprune.eval.realism assets/benchmark_vlm16 assets/benchmark --out assets/benchmark_vlm16
    python -m vlmprune.eval.realism "assets/benchmark_vlm16:fastv=fastv[k_layer=1]"   # another row stands for FastV

For each ``results.json`` given (a ``vlmprune eval`` output folder or the file itself) it prints

* the **relative-to-full accuracy** of every method: accuracy at a budget divided by the
  unpruned model's on the same task and questions, per task and as the mean over the tasks;
* the **realism check**: at each of LLaVA-1.5's budgets (192 / 128 / 64 of 576 visual tokens,
  i.e. keep 33.3 / 22.2 / 11.1 %, the same fractions of the embedded model's 256), the order of
  FastV, SparseVLM and VisionZip on the embedded benchmark against their published order on
  LLaVA-1.5-7B (:data:`PUBLISHED`), as a Spearman rank correlation (1: same order, -1: reversed),
  per task and for the mean over the tasks;

and writes ``realism.png`` (``--out``): per budget, the three methods' relative scores published
and on each benchmark given.

The published score of a method is its mean over the seven benchmarks of the table of its
score relative to the unpruned LLaVA-1.5-7B (how VisionZip's table computes its "Avg" column).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: VisionZip paper (Yang et al., arXiv 2412.04467), Table 1, LLaVA-1.5-7B, as transcribed in
#: ``shared/methods/baselines.md`` (a): GQA, MMB, MME, POPE, SQA-img, VQAv2, TextVQA. The card
#: marks FastV@192's POPE/SQA (64.8 / 67.3; another transcription has 67.3 / 67.1) and VQAv2 at
#: 128 / 64 as unverified; neither changes an order below.
PUBLISHED_BENCHMARKS = ("GQA", "MMB", "MME", "POPE", "SQA", "VQAv2", "TextVQA")
PUBLISHED_FULL = (61.9, 64.7, 1862, 85.9, 69.5, 78.5, 58.2)
PUBLISHED = {
    192: {"fastv": (52.7, 61.2, 1612, 64.8, 67.3, 67.1, 52.5),
          "sparsevlm": (57.6, 62.5, 1721, 83.6, 69.1, 75.6, 56.1),
          "visionzip": (59.3, 63.0, 1782.6, 85.3, 68.9, 76.8, 57.3)},
    128: {"fastv": (49.6, 56.1, 1490, 59.6, 60.2, 61.8, 50.6),
          "sparsevlm": (56.0, 60.0, 1696, 80.5, 67.1, 73.8, 54.9),
          "visionzip": (57.6, 62.0, 1761.7, 83.2, 68.9, 75.6, 56.8)},
    64: {"fastv": (46.1, 48.0, 1256, 48.0, 51.1, 55.0, 47.8),
         "sparsevlm": (52.7, 56.2, 1505, 75.1, 62.2, 68.2, 51.8),
         "visionzip": (55.1, 60.1, 1690, 77.0, 69.0, 72.4, 55.5)},
}
LLAVA_TOKENS = 576
#: the embedded benchmark's budgets standing for LLaVA-1.5's 192 / 128 / 64 (``vlmprune eval``'s defaults)
BUDGET_OF = {192: 0.333, 128: 0.222, 64: 0.111}
COMPARED = ("fastv", "sparsevlm", "visionzip")


def published_relative(tokens: int, method: str) -> float:
    """Mean over the table's benchmarks of the method's score / the unpruned model's."""
    scores = PUBLISHED[tokens][method]
    return sum(s / f for s, f in zip(scores, PUBLISHED_FULL)) / len(scores)


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ascending; tied values share the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on the ranks, ties averaged); nan when either side
    is constant."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"spearman: need two equal-length lists of at least 2 values, got {len(a)} and {len(b)}")
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return float("nan") if va == 0 or vb == 0 else cov / (va * vb) ** 0.5


def parse_stand_ins(text: str) -> dict[str, str]:
    """``"fastv=fastv[k_layer=1],..."`` -> ``{"fastv": "fastv[k_layer=1]"}`` (methods of :data:`COMPARED`)."""
    items, depth, cur = [], 0, ""
    for ch in text:  # split on the commas outside brackets: a row label may hold several options
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    out = {}
    for item in filter(None, (t.strip() for t in items + [cur])):
        method, sep, row = item.partition("=")
        if not sep or method not in COMPARED or not row:
            raise SystemExit(f"vlmprune.eval.realism: results: {item!r} is not METHOD=ROW with METHOD one of {list(COMPARED)}")
        out[method] = row
    return out


def load_results(path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise SystemExit(f"vlmprune.eval.realism: no results.json at {path} (a `vlmprune eval --out` folder)")
    with open(path) as f:
        data = json.load(f)
    data["path"] = str(path)
    return data


def relative_scores(rows: list[dict]) -> dict:
    """``{method: {budget: {task: relative accuracy, ..., "mean": over the tasks}}}`` against the
    unpruned rows (method ``none``) of the same task."""
    full = {r["task"]: r["accuracy"] for r in rows if r["method"] == "none"}
    tasks = list(full)
    out: dict = {}
    for r in rows:
        if r["method"] == "none" or r["task"] not in full or not full[r["task"]]:
            continue
        out.setdefault(r["method"], {}).setdefault(r["budget"], {})[r["task"]] = r["accuracy"] / full[r["task"]]
    for per_budget in out.values():
        for cells in per_budget.values():
            if all(t in cells for t in tasks):
                cells["mean"] = sum(cells[t] for t in tasks) / len(tasks)
    return out


def realism(rows: list[dict], stand_ins: dict[str, str] | None = None) -> dict:
    """Per LLaVA budget: the published and embedded relative scores of :data:`COMPARED` and the
    Spearman correlation of their orders, per task and over the mean (``None`` where a method or
    budget is missing from the rows). ``stand_ins`` maps a compared method to the row that stands
    for it (e.g. ``{"fastv": "fastv[k_layer=1]"}``: FastV at the same fraction of the depth)."""
    rel = relative_scores(rows)
    label = {m: (stand_ins or {}).get(m, m) for m in COMPARED}
    tasks = list(dict.fromkeys(r["task"] for r in rows if r["method"] == "none")) + ["mean"]
    out = {}
    for tokens, budget in BUDGET_OF.items():
        published = [published_relative(tokens, m) for m in COMPARED]
        entry = {"budget": budget, "published": dict(zip(COMPARED, published)), "embedded": {}, "spearman": {}}
        for task in tasks:
            vals = [rel.get(label[m], {}).get(budget, {}).get(task) for m in COMPARED]
            if any(v is None for v in vals):
                entry["spearman"][task] = None
                continue
            entry["embedded"][task] = dict(zip(COMPARED, vals))
            entry["spearman"][task] = spearman(vals, published)
        out[tokens] = entry
    return out


def relative_table(rows: list[dict]) -> str:
    """Markdown: relative-to-full accuracy (%) of every method, mean over the tasks, per budget,
    then per task."""
    rel = relative_scores(rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows if r["method"] == "none"))
    budgets = sorted({b for per in rel.values() for b in per}, reverse=True)
    head = "| method | " + " | ".join(f"mean {b * 100:.1f} %" for b in budgets) + " | " + " | ".join(
        f"{t} {b * 100:.1f} %" for t in tasks for b in budgets) + " |"
    lines = [head, "|---|" + "---|" * (len(budgets) * (len(tasks) + 1))]
    order = sorted(rel, key=lambda m: -min((rel[m].get(b, {}).get("mean", 0.0) for b in budgets), default=0.0))
    for m in order:
        cells = [rel[m].get(b, {}).get(t) for t in ["mean", *tasks] for b in budgets]
        lines.append(f"| `{m}` | " + " | ".join("" if v is None else f"{v * 100:.1f}" for v in cells) + " |")
    return "\n".join(lines)


def realism_table(results: list[dict]) -> str:
    """Markdown: per LLaVA budget, published relative scores and each benchmark's, with the
    Spearman correlation of each order against the published one."""
    lines = ["| LLaVA budget (keep) | source | " + " | ".join(COMPARED) + " | Spearman vs published |",
             "|---|---|" + "---|" * (len(COMPARED) + 1)]
    checks = [(data["label"], realism(data["rows"], data.get("stand_ins"))) for data in results]
    for tokens, budget in BUDGET_OF.items():
        pub = {m: published_relative(tokens, m) for m in COMPARED}
        lines.append(f"| {tokens} / {LLAVA_TOKENS} ({budget * 100:.1f} %) | LLaVA-1.5-7B (VisionZip Table 1) | "
                     + " | ".join(f"{pub[m] * 100:.1f}" for m in COMPARED) + " | |")
        for label, check in checks:
            entry = check[tokens]
            for task, rho in entry["spearman"].items():
                if rho is None:
                    continue
                vals = entry["embedded"][task]
                lines.append(f"| | {label}: {task} | " + " | ".join(f"{vals[m] * 100:.1f}" for m in COMPARED)
                             + f" | {rho:+.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    sources = [("LLaVA-1.5-7B (published)", None)] + [(d["label"], realism(d["rows"], d.get("stand_ins"))) for d in results]
    fig, axes = plt.subplots(1, len(BUDGET_OF), figsize=(4.6 * len(BUDGET_OF), 4.0), sharey=True)
    width = 0.8 / len(sources)
    for ax, (tokens, budget) in zip(axes, BUDGET_OF.items()):
        for k, (label, check) in enumerate(sources):
            if check is None:
                vals = [published_relative(tokens, m) for m in COMPARED]
            else:
                emb = check[tokens]["embedded"].get("mean")
                if emb is None:
                    continue
                vals = [emb[m] for m in COMPARED]
                rho = check[tokens]["spearman"]["mean"]
                label = f"{label} (rho {rho:+.2f})"
            xs = [i + (k - (len(sources) - 1) / 2) * width for i in range(len(COMPARED))]
            ax.bar(xs, [v * 100 for v in vals], width=width, label=label, color=plt.get_cmap("tab10")(k))
        ax.set_xticks(range(len(COMPARED)))
        ax.set_xticklabels(COMPARED)
        ax.set_title(f"{tokens} of {LLAVA_TOKENS} (keep {budget * 100:.1f} %)")
        ax.set_ylim(40, 102)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    axes[0].set_ylabel("accuracy relative to all tokens (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmprune.eval.realism", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+",
                   help="`vlmprune eval --out` folders (or their results.json), each optionally followed by "
                        "':METHOD=ROW,...', the rows standing for the compared methods (e.g. "
                        "'assets/benchmark_vlm16:fastv=fastv[k_layer=1]'); the same folder may come twice")
    p.add_argument("--labels", default="", help="comma-separated labels, one per results (default: the model)")
    p.add_argument("--out", type=Path, default=None, help="folder for realism.png (default: no plot)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    results = []
    for spec in args.results:
        path, _, maps = spec.partition(":")
        data = load_results(path)
        data["stand_ins"] = parse_stand_ins(maps)
        results.append(data)
    labels = [s for s in args.labels.split(",") if s] if args.labels else [d["config"]["model"] for d in results]
    if len(labels) != len(results):
        raise SystemExit(f"vlmprune.eval.realism: --labels: {len(labels)} labels for {len(results)} results")
    for data, label in zip(results, labels):
        data["label"] = label
        print(f"## {label} ({data['path']}): accuracy relative to all tokens (%)\n")
        print(relative_table(data["rows"]) + "\n")
    print("## Realism: FastV, SparseVLM, VisionZip relative to all tokens (%), and the order's rank correlation\n")
    print(realism_table(results))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        plot(results, args.out / "realism.png")
        print(f"\nwrote {args.out / 'realism.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
