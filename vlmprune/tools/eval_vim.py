"""``python -m vlmprune.tools.eval_vim``: the embedded Vim (easyvqa-cls, ``assets/embedded_vim``)
with its patch tokens pruned, offline on CPU: ToP-ViM against ViT pruning methods on a vision Mamba.

For each row of :data:`RUNS` (ToP-ViM, its code-exact form, uniform, random, DivPrune, ToMe) and
keep budget (:data:`BUDGETS`: 50 %, 25 %, 12.5 % of the 64 patches), the accuracy on the first
``--images`` easy-VQA test images (colour and shape both right, and each alone), the images/s of
the batches after the first (a warm-up), its ratio to the unwrapped model timed right before on
the same batches, ``tokens_kept`` (the patches the last block scans), ``token_blocks`` (the
tokens each of the 6 blocks scans, summed, as a fraction of the unpruned count) and ``gflops``
per image (:func:`gflops_of`). ToP-ViM prunes after blocks 1, 3 and 4 (5, 10, 15 of 24 scaled)
down to the budget; the ViT methods prune once, at ``mixer:L`` for each ``L`` in :data:`LAYERS`
(3, the adapter's default, and 1, ToP-ViM's first point); ToMe takes no budget and merges a
constant ``r`` after every block, the ``r`` whose count reaching the last block comes closest to
the budget (:func:`tome_r`; column ``r``). The unwrapped model is the ``method="none"`` row.
Writes ``results.json``, ``results.csv`` and ``accuracy_vs_tokens.png`` under ``--out``.
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
from vlmprune.methods.tome import token_counts
from vlmprune.tools._common import images_per_second

#: (row name, method, options): the methods that act on a Vim
RUNS = (
    ("top_vim", "top_vim", {}),
    ("top_vim code_exact", "top_vim", {"code_exact": True}),
    ("uniform", "uniform", {}),
    ("random", "random", {}),
    ("divprune", "divprune", {}),
    ("tome", "tome", {}),
)
#: patches kept at the end: 50 %, 25 %, 12.5 % of the 8 x 8 grid
BUDGETS = (32, 16, 8)
#: where the one-point ViT methods prune: the adapter's default (depth // 2) and ToP-ViM's first point
LAYERS = (3, 1)
FIELDS = ("method", "budget", "r", "layers", "tokens_kept", "images", "colour", "shape", "both",
          "token_blocks", "gflops", "images_per_s", "speed_ratio", "timed_batches")


def block_counts(points: list[dict], n: int, depth: int) -> list[int]:
    """The patches each of the ``depth`` blocks scans: a point ``mixer:l`` with ``out`` patches
    sets the count from block ``l`` on (a point after the last block changes none)."""
    counts = [n] * depth
    for p in points:
        layer = int(str(p["point"]).split(":")[1])
        for b in range(layer, depth):
            counts[b] = p["out"][0]
    return counts


def token_blocks(points: list[dict], n: int, depth: int) -> float:
    """Tokens (class token included) scanned by the ``depth`` blocks, summed, over the unpruned
    count (:func:`block_counts`)."""
    return sum(c + 1 for c in block_counts(points, n, depth)) / ((n + 1) * depth)


def gflops_of(model, counts: list[int]) -> float:
    """GFLOPs per image (1 multiply-add = 2 FLOPs) of the patch embedding and of blocks that scan
    ``counts[l] + 1`` tokens (class token included): per token, the mixer's linear and
    depthwise-convolution weights once each, and per scan direction ``4 * d_inner * d_state``
    multiply-adds for the selective scan (discretisation, input, state update, readout; an
    estimate: mambapy's parallel scan pads to a power of two, not counted). Norms, the head and
    the method's own work are left out."""
    block = model.backbone.layers[0].mixer
    weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d)))
    d_inner, d_state = block.A_log.shape
    per_token = weights + 2 * 4 * d_inner * d_state
    embed = model.patch_embed.weight.numel() * model.config.n_patches
    return 2 * (embed + per_token * sum(c + 1 for c in counts)) / 1e9


def tome_r(n: int, depth: int, budget: int) -> int:
    """The constant ToMe ``r`` whose patch count reaching the last of ``depth`` blocks (after
    ``depth - 1`` merges, ToMe's cap of half the tokens applied) is closest to ``budget`` (the
    smaller ``r`` on a tie)."""
    return min(range(n // 2 + 1), key=lambda r: abs(token_counts(n, [r] * depth)[depth - 1] - budget))


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
    rows = [{"method": "none", "budget": None, "r": None, "layers": None, "tokens_kept": n, "images": len(x), **acc,
             "token_blocks": 1.0, "gflops": gflops_of(model, [n] * depth), "images_per_s": speed, "speed_ratio": 1.0,
             "timed_batches": timed}]
    log(rows[0])
    for name, method, options in runs:
        for layer in ([None] if method in ("top_vim", "tome") else layers):
            for budget in budgets:
                extra = dict(options) if layer is None else {**options, "boundary_layer": layer}
                r = tome_r(n, depth, budget) if method == "tome" else None
                amount = {"r": r} if method == "tome" else {"budget": budget}
                reference = images_per_second(model, batches[1:])
                torch.manual_seed(seed)
                with vlmprune.wrap(model, method, **amount, **extra) as handle:
                    acc, speed, timed = _run(model, batches, labels)
                    points = handle.stats["points"]
                counts = block_counts(points, n, depth)
                row = {"method": name, "budget": budget, "r": r, "layers": [int(str(p["point"]).split(":")[1]) for p in points],
                       "tokens_kept": counts[-1], "images": len(x), **acc,
                       "token_blocks": token_blocks(points, n, depth), "gflops": gflops_of(model, counts), "images_per_s": speed,
                       "speed_ratio": speed / reference, "timed_batches": timed}
                rows.append(row)
                log(row)
    return rows


def _curve(row: dict) -> tuple[str, str]:
    """The plot line a row belongs to: (method, legend label)."""
    name, layers = row["method"], row["layers"]
    if name.startswith("top_vim"):
        return name, f"{name} (blocks {'/'.join(map(str, layers))})"
    if name == "tome":
        return name, "tome (constant r, after every block)"
    return name, f"{name} (mixer:{layers[0]})"


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
    curves: dict[tuple[str, str], list] = {}
    for r in rows[1:]:
        curves.setdefault(_curve(r), []).append((r["tokens_kept"], r["both"]))
    for (name, tag), pts in curves.items():
        style = "--" if tag.endswith(f"(mixer:{LAYERS[1]})") else "-"
        pts = sorted(pts)
        ax.plot([k for k, _ in pts] + [base["tokens_kept"]], [a for _, a in pts] + [base["both"]], style, marker="o", label=tag)
    ticks = sorted({r["budget"] for r in rows[1:]} | {base["tokens_kept"]})  # ToMe's counts fall between them
    ax.set(xscale="log", xticks=ticks, xticklabels=[str(t) for t in ticks], xlabel=f"patch tokens the last block scans (of {base['tokens_kept']})",
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
