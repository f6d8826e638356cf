"""``python -m vlmprune.tools.eval_vit``: the embedded ViT-S/14 classifier (easyvqa-cls) with its
patch tokens pruned, offline on CPU.

For each method that runs at the plain-ViT adapter's boundary (:data:`METHODS`), keep budget
(:data:`BUDGETS`: 50 %, 25 %, 12.5 % of the 256 patch tokens) and boundary layer (:data:`LAYERS`:
12 = after the last block, the adapter's default; 6 = halfway, so blocks 7-12 run on fewer
tokens), the accuracy on the first ``--images`` easy-VQA test images (colour, shape, both right),
the images/s of the batches after the first (a warm-up), its ratio to the unwrapped model timed right
before on the same batches (at layer 6) and the GFLOPs per image from the token
counts each block sees (:func:`gflops`). The unwrapped model is the ``method="none"`` row.
Writes ``results.csv``, ``results.json`` and ``accuracy_vs_tokens.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

import vlmprune
from vlmprune.embedded import model as embedded
from vlmprune.embedded.vit import DEPTH, cls_data, load_vit, preprocess

#: the methods the ViT adapter's boundary runs (adapters/vit.py, README "Models")
METHODS = ("divprune", "uniform", "random", "visionzip", "hiprune", "holov", "fopru")
#: patch tokens kept: 50 %, 25 %, 12.5 % of the 16 x 16 grid
BUDGETS = (128, 64, 32)
#: boundary layers: DEPTH (the adapter's default) and halfway
LAYERS = (DEPTH, DEPTH // 2)
FIELDS = ("method", "budget", "boundary_layer", "tokens_kept", "images", "colour", "shape", "both",
          "gflops", "images_per_s", "speed_ratio", "timed_batches")


def gflops(kept: int | None = None, layer: int = DEPTH, config: dict = embedded.VIT_CONFIG,
           size: int = embedded.IMAGE_SIZE) -> float:
    """GFLOPs per image (1 multiply-add = 2 FLOPs) of the ViT's patch embedding and blocks at
    ``size`` px input, ``kept`` patch tokens after block ``layer`` (None: all). A block on ``n``
    tokens (CLS included), width ``d``, MLP width ``m``: qkv ``6nd^2`` + scores and weighted sum
    ``4n^2d`` + output projection ``2nd^2`` + MLP ``4ndm``. Sizes from the config (ViT-S/14: d 384,
    m 1536, 12 blocks, patch 14: 256 patches at 224 px)."""
    d, m, p = config["hidden_size"], config["intermediate_size"], config["patch_size"]
    grid = (size // p) ** 2
    total = 2 * grid * 3 * p * p * d
    for block in range(config["num_hidden_layers"]):
        n = 1 + (grid if kept is None or block < layer else kept)
        total += 8 * n * d * d + 4 * n * n * d + 4 * n * d * m
    return total / 1e9


def _speed(model, batches) -> float:
    """images/s of ``model`` (already warm) over ``batches``."""
    with torch.no_grad():
        t = time.perf_counter()
        for x in batches:
            model(x)
        return sum(len(x) for x in batches) / (time.perf_counter() - t)


def _run(model, batches, colour, shape) -> tuple[dict, float, int]:
    """Accuracy over ``batches`` and images/s over all batches but the first (warm-up)."""
    right_c = right_s = right_b = 0
    seconds, timed, start = 0.0, 0, 0
    with torch.no_grad():
        for i, x in enumerate(batches):
            t = time.perf_counter()
            out = model(x)
            if i:
                seconds += time.perf_counter() - t
                timed += len(x)
            c = out["colour"].argmax(-1) == colour[start:start + len(x)]
            s = out["shape"].argmax(-1) == shape[start:start + len(x)]
            right_c, right_s, right_b = right_c + int(c.sum()), right_s + int(s.sum()), right_b + int((c & s).sum())
            start += len(x)
    n = start
    acc = {"colour": right_c / n, "shape": right_s / n, "both": right_b / n}
    return acc, (timed / seconds if timed else float("nan")), len(batches) - 1


def evaluate(images: int = 300, batch: int = 64, methods=METHODS, budgets=BUDGETS, layers=LAYERS,
             kind: str = "timm", seed: int = 0, timed_layers=(DEPTH // 2,), log=print) -> list[dict]:
    """The rows of the benchmark: first the unwrapped model (``method="none"``), then one per
    method x layer x budget. Each wrapped run starts from ``torch.manual_seed(seed)``. At the
    ``timed_layers`` the unwrapped model is timed again on the same batches right before each
    wrapped run (as ``vlmprune bench`` does, so background load affects both alike) and
    ``speed_ratio`` is wrapped / that; elsewhere ``speed_ratio`` is None."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods must be among {METHODS}, got {unknown}")
    if batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    vit = load_vit(kind=kind, head="cls")
    _, pics, colour, shape = cls_data("test", images)
    x = preprocess(pics)
    batches = list(x.split(batch))
    acc, speed, timed = _run(vit, batches, colour, shape)
    base = {"method": "none", "budget": None, "boundary_layer": None, "tokens_kept": 256, "images": images,
            **acc, "gflops": gflops(), "images_per_s": speed, "speed_ratio": 1.0, "timed_batches": timed}
    rows = [base]
    log(base)
    for method in methods:
        for layer in layers:
            for budget in budgets:
                reference = _speed(vit, batches[1:]) if layer in timed_layers else None
                torch.manual_seed(seed)
                with vlmprune.wrap(vit.backbone, method, budget=budget, boundary_layer=layer) as handle:
                    acc, speed, timed = _run(vit, batches, colour, shape)
                    kept = sorted(set(handle.stats["points"][0]["out"]))
                row = {"method": method, "budget": budget, "boundary_layer": layer,
                       "tokens_kept": kept[0] if len(kept) == 1 else kept, "images": images, **acc,
                       "gflops": gflops(budget, layer), "images_per_s": speed,
                       "speed_ratio": speed / reference if reference else None, "timed_batches": timed}
                rows.append(row)
                log(row)
    return rows


def write(rows: list[dict], out: Path) -> None:
    """``results.json``, ``results.csv`` and the plot ``accuracy_vs_tokens.png`` under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    base = rows[0]
    layers = sorted({r["boundary_layer"] for r in rows[1:]}, reverse=True)
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, layer in zip(axes, layers):
        for method in dict.fromkeys(r["method"] for r in rows[1:]):
            pts = sorted((r["budget"], r["both"]) for r in rows[1:] if r["method"] == method and r["boundary_layer"] == layer)
            ax.plot([b for b, _ in pts] + [256], [a for _, a in pts] + [base["both"]], marker="o", label=method)
        ax.set(xscale="log", xticks=[32, 64, 128, 256], xticklabels=["32", "64", "128", "256"],
               xlabel="patch tokens kept (of 256)", title=f"boundary_layer={layer}")
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"easyvqa-cls accuracy, both right ({base['images']} test images)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_tokens.png", dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300, help="first N easy-VQA test images (default 300)")
    ap.add_argument("--batch", type=int, default=64, help="images per forward (default 64)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--kind", default="timm", choices=("timm", "hf"), help="backbone port (default timm)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", type=Path, default=Path("assets/benchmark_vit"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = evaluate(args.images, args.batch, args.methods, kind=args.kind, seed=args.seed,
                    log=lambda r: print(json.dumps(r), flush=True))
    write(rows, args.out)


if __name__ == "__main__":
    main()
