"""``python -m vlmprune.tools.eval_vim``: the embedded Vim (easyvqa-cls, ``assets/embedded_vim``)
with its patch tokens pruned, offline on CPU: ToP-ViM against ViT pruning methods on a vision Mamba.

For each row of :data:`RUNS` (ToP-ViM, its code-exact form, uniform, random, DivPrune) and keep
budget (:data:`BUDGETS`: 50 %, 25 %, 12.5 % of the 64 patches), the accuracy on the first
``--images`` easy-VQA test images (colour and shape both right, and each alone), the images/s of
the batches after the first (a warm-up), its ratio to the unwrapped model timed right before on
the same batches, and ``token_blocks``: the tokens each of the 6 blocks scans, summed, as a
fraction of the unpruned count (the blocks' cost is linear in the tokens). ToP-ViM prunes after
blocks 1, 3 and 4 (5, 10, 15 of 24 scaled) down to the budget; the ViT methods prune once, at
``mixer:L`` for each ``L`` in :data:`LAYERS` (3, the adapter's default, and 1, ToP-ViM's first
point). The unwrapped model is the ``method="none"`` row. Writes ``results.json``,
``results.csv`` and ``accuracy_vs_tokens.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

import vlmprune
from vlmprune.embedded import vim_training
from vlmprune.embedded.vim_model import load_vim
from vlmprune.tools._common import images_per_second

#: (row name, method, options): the methods that act on a Vim
RUNS = (
    ("top_vim", "top_vim", {}),
    ("top_vim code_exact", "top_vim", {"code_exact": True}),
    ("uniform", "uniform", {}),
    ("random", "random", {}),
    ("divprune", "divprune", {}),
)
#: patches kept at the end: 50 %, 25 %, 12.5 % of the 8 x 8 grid
BUDGETS = (32, 16, 8)
#: where the one-point ViT methods prune: the adapter's default (depth // 2) and ToP-ViM's first point
LAYERS = (3, 1)
FIELDS = ("method", "budget", "layers", "tokens_kept", "images", "colour", "shape", "both",
          "token_blocks", "images_per_s", "speed_ratio", "timed_batches")


def token_blocks(points: list[dict], n: int, depth: int) -> float:
    """Tokens (class token included) scanned by the ``depth`` blocks, summed, over the unpruned
    count: a point ``mixer:l`` with ``out`` patches sets the count from block ``l`` on."""
    counts = [n] * depth
    for p in points:
        layer = int(str(p["point"]).split(":")[1])
        for b in range(layer, depth):
            counts[b] = p["out"][0]
    return sum(c + 1 for c in counts) / ((n + 1) * depth)


def _run(model, batches, labels) -> tuple[dict, float, int]:
    """Accuracy over ``batches`` and images/s over all batches but the first (warm-up)."""
    s = 3
    pred, seconds, timed = [], 0.0, 0
    with torch.no_grad():
        for i, x in enumerate(batches):
            t = time.perf_counter()
            pred.append(model(x).argmax(-1))
            if i:
                seconds += time.perf_counter() - t
                timed += len(x)
    pred = torch.cat(pred)
    acc = {"colour": float((pred // s == labels // s).float().mean()), "shape": float((pred % s == labels % s).float().mean()),
           "both": float((pred == labels).float().mean())}
    return acc, (timed / seconds if timed else float("nan")), len(batches) - 1



def evaluate(images: int = 954, batch: int = 64, runs=RUNS, budgets=BUDGETS, layers=LAYERS, seed: int = 0,
             log=print, weights=None) -> list[dict]:
    """The rows: the unwrapped model, then one per run x budget (x layer for the one-point
    methods), each wrapped run from ``torch.manual_seed(seed)``, its speed against the unwrapped
    model timed right before on the same batches. ``weights``: a directory
    :func:`~vlmprune.embedded.vim_model.load_vim` reads (None: the committed embedded Vim)."""
    if batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    model = load_vim(weights)
    depth, n = model.config.depth, model.config.n_patches
    x, labels = vim_training.dataset("test", images)
    batches = list(x.split(batch))
    acc, speed, timed = _run(model, batches, labels)
    rows = [{"method": "none", "budget": None, "layers": None, "tokens_kept": n, "images": len(x), **acc,
             "token_blocks": 1.0, "images_per_s": speed, "speed_ratio": 1.0, "timed_batches": timed}]
    log(rows[0])
    for name, method, options in runs:
        for layer in ([None] if method == "top_vim" else layers):
            for budget in budgets:
                extra = dict(options) if layer is None else {**options, "boundary_layer": layer}
                reference = images_per_second(model, batches[1:])
                torch.manual_seed(seed)
                with vlmprune.wrap(model, method, budget=budget, **extra) as handle:
                    acc, speed, timed = _run(model, batches, labels)
                    points = handle.stats["points"]
                row = {"method": name, "budget": budget, "layers": [int(str(p["point"]).split(":")[1]) for p in points],
                       "tokens_kept": points[-1]["out"][0], "images": len(x), **acc,
                       "token_blocks": token_blocks(points, n, depth), "images_per_s": speed,
                       "speed_ratio": speed / reference, "timed_batches": timed}
                rows.append(row)
                log(row)
    return rows


def write(rows: list[dict], out: Path) -> None:
    """``results.json``, ``results.csv`` and ``accuracy_vs_tokens.png`` under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows({**r, "layers": " ".join(map(str, r["layers"] or []))} for r in rows)
    base = rows[0]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label in dict.fromkeys((r["method"], tuple(r["layers"])) if r["method"].startswith("top_vim") else (r["method"], r["layers"][0]) for r in rows[1:]):
        name, where = label
        pts = sorted((r["tokens_kept"], r["both"]) for r in rows[1:] if r["method"] == name
                     and (tuple(r["layers"]) == where if name.startswith("top_vim") else r["layers"][0] == where))
        tag = f"{name} (blocks {'/'.join(map(str, where))})" if name.startswith("top_vim") else f"{name} (mixer:{where})"
        style = "-" if name.startswith("top_vim") or where == LAYERS[0] else "--"
        ax.plot([k for k, _ in pts] + [base["tokens_kept"]], [a for _, a in pts] + [base["both"]], style, marker="o", label=tag)
    ticks = sorted({r["tokens_kept"] for r in rows})
    ax.set(xscale="log", xticks=ticks, xticklabels=[str(t) for t in ticks], xlabel=f"patch tokens kept at the end (of {base['tokens_kept']})",
           ylabel=f"easyvqa-cls accuracy, both right ({base['images']} test images)", title="embedded Vim (6 blocks)")
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_tokens.png", dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=954, help="first N easy-VQA test images (default: all 954)")
    ap.add_argument("--batch", type=int, default=64, help="images per forward (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a small Mamba's scan slows down when spread)")
    ap.add_argument("--out", type=Path, default=Path("assets/benchmark_vim"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = evaluate(args.images, args.batch, seed=args.seed, log=lambda r: print(json.dumps(r), flush=True))
    write(rows, args.out)


if __name__ == "__main__":
    main()
