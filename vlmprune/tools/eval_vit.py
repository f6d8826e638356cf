"""``python -m vlmprune.tools.eval_vit``: the embedded ViT-S/14 with its patch tokens pruned or
merged, on easyvqa-cls (accuracy) and easyvqa-seg (mIoU), offline on CPU.

For each task (:data:`TASKS`) and method (:data:`METHODS`) three settings: the boundary methods
keep :data:`BUDGETS` (50 %, 25 %, 12.5 % of the 256 patch tokens) from ``boundary_layer`` 6 on
(blocks 7-12 run on fewer tokens); ToMe merges a constant ``r`` per block, the ``r`` whose GFLOPs
come closest to the boundary methods' at that budget (:func:`tome_r`); DToP (segmentation only)
exits tokens at the official heads after blocks 5 and 7 with p0 in :data:`THRESHOLDS`. Each row
has the metric on the first ``--images`` easy-VQA test images, the mean patch tokens after the
last point, the GFLOPs per image from the token counts each block saw (:func:`gflops_of`; rows
of different lengths counted unpadded), the images/s of the batches after the first (a warm-up;
the better of that pass and one more) and its ratio to the unwrapped model's best of two passes
on the same batches right before. The unwrapped model
is the ``method="none"`` row. Writes ``results_<task>.csv``/``.json`` and ``<task>_vs_gflops.png``
under ``--out``.
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
from vlmprune.embedded.vit import (
    DEPTH,
    cls_data,
    confusion,
    load_vit,
    mean_iou,
    preprocess,
    seg_data,
)
from vlmprune.methods.tome import parse_r, token_counts
from vlmprune.tools._common import images_per_second

TASKS = ("cls", "seg")
#: the methods at the ViT adapter's boundary (README "Models"), then the ViT family's own
BOUNDARY = ("divprune", "uniform", "random", "visionzip", "hiprune", "holov", "fopru")
METHODS = BOUNDARY + ("tome", "dtop")
#: patch tokens kept by the boundary methods: 50 %, 25 %, 12.5 % of the 16 x 16 grid
BUDGETS = (128, 64, 32)
#: DToP's p0 values (0.9: the official ViT-B configs)
THRESHOLDS = (0.99, 0.95, 0.9)
LAYER = DEPTH // 2
PATCHES = 256
FIELDS = ("task", "method", "setting", "tokens_kept", "images", "colour", "shape", "both", "miou", "gflops",
          "images_per_s", "speed_ratio", "timed_batches")


def gflops_of(attention: list[int], mlp: list[int] | None = None, config: dict = embedded.VIT_CONFIG,
              size: int = embedded.IMAGE_SIZE) -> float:
    """GFLOPs per image (1 multiply-add = 2 FLOPs) of the patch embedding and the blocks, block
    ``l`` attending over ``attention[l]`` tokens and running its MLP on ``mlp[l]`` (default: the
    same; CLS included). Attention side on ``n`` tokens, width ``d``: qkv ``6nd^2``, scores and
    weighted sum ``4n^2d``, output projection ``2nd^2``; MLP (width ``m``) ``4ndm``. Sizes from the
    config (ViT-S/14: d 384, m 1536, patch 14: 256 patches at 224 px)."""
    d, m, p = config["hidden_size"], config["intermediate_size"], config["patch_size"]
    mlp = attention if mlp is None else mlp
    total = 2 * (size // p) ** 2 * 3 * p * p * d
    for n, k in zip(attention, mlp):
        total += 8 * n * d * d + 4 * n * n * d + 4 * k * d * m
    return total / 1e9


def gflops(kept: int | None = None, layer: int = DEPTH, config: dict = embedded.VIT_CONFIG,
           size: int = embedded.IMAGE_SIZE) -> float:
    """:func:`gflops_of` with every block on all tokens, or ``kept`` patch tokens from block
    ``layer`` on (a boundary method at ``boundary_layer=layer``)."""
    grid = (size // config["patch_size"]) ** 2
    return gflops_of([1 + (grid if kept is None or block < layer else kept) for block in range(config["num_hidden_layers"])],
                     config=config, size=size)


def tome_r(kept: int, layer: int = LAYER, depth: int = DEPTH, n: int = PATCHES) -> int:
    """The constant ToMe ``r`` whose GFLOPs come closest to a boundary method keeping ``kept`` of
    ``n`` patches from block ``layer`` on."""
    target = gflops(kept, layer)

    def cost(r: int) -> float:
        counts = token_counts(n, parse_r(depth, r))
        return gflops_of([1 + c for c in counts[:-1]], [1 + c for c in counts[1:]])

    return min(range(n // 2 + 1), key=lambda r: abs(cost(r) - target))


def block_counts(points: list[dict], images: int, depth: int = DEPTH, n: int = PATCHES) -> tuple[list, list]:
    """Per image, the tokens (CLS included) each block attends over and runs its MLP on, from a
    forward's ``handle.stats["points"]`` (``vit:l`` before block ``l``, ``vit_mlp:l`` before block
    ``l``'s MLP)."""
    outs = {p["point"]: p["out"] for p in points}
    attention, mlp = [], []
    for i in range(images):
        count, a, m = n, [], []
        for block in range(depth):
            if f"vit:{block}" in outs:
                count = outs[f"vit:{block}"][i]
            a.append(1 + count)
            if f"vit_mlp:{block}" in outs:
                count = outs[f"vit_mlp:{block}"][i]
            m.append(1 + count)
        attention.append(a)
        mlp.append(m)
    return attention, mlp



class Task:
    """The data and scoring of one task: ``batches`` of pixels and ``score(outputs)`` -> metrics."""

    def __init__(self, task: str, images: int, batch: int):
        if task == "cls":
            _, pics, self.colour, self.shape = cls_data("test", images)
        else:
            _, pics, self.masks = seg_data("test", images)
        self.task = task
        self.batches = list(preprocess(pics).split(batch))

    def score(self, outputs: list) -> dict:
        if self.task == "cls":
            colour = torch.cat([o["colour"].argmax(-1) for o in outputs]) == self.colour
            shape = torch.cat([o["shape"].argmax(-1) for o in outputs]) == self.shape
            n = len(colour)
            return {"colour": int(colour.sum()) / n, "shape": int(shape.sum()) / n, "both": int((colour & shape).sum()) / n}
        return {"miou": mean_iou(confusion(torch.cat([o.argmax(1) for o in outputs]), self.masks))[0]}


def _run(model, task: Task, handle=None) -> tuple[dict, float, list[float], float]:
    """Metrics over the task's batches, images/s over all batches but the first (a warm-up), and
    per image the GFLOPs and final patch tokens (from ``handle``'s stats after each batch)."""
    outputs, flops, kept = [], [], []
    seconds, timed = 0.0, 0
    with torch.no_grad():
        for i, x in enumerate(task.batches):
            t = time.perf_counter()
            outputs.append(model(x))
            if i:
                seconds += time.perf_counter() - t
                timed += len(x)
            points = handle.stats["points"] if handle is not None else []
            attention, mlp = block_counts(points, len(x))
            flops += [gflops_of(a, m) for a, m in zip(attention, mlp)]
            kept += points[-1]["out"] if points else [PATCHES] * len(x)
    speed = timed / seconds if timed else float("nan")
    return task.score(outputs), speed, flops, sum(kept) / len(kept)


def settings(task: str, method: str, budgets=BUDGETS, thresholds=THRESHOLDS) -> list[tuple[str, dict]]:
    """``(label, wrap options)`` of each setting of ``method`` on ``task``."""
    if method == "tome":
        return [(f"r={tome_r(k)} (~{k} tokens)", {"r": tome_r(k)}) for k in budgets]
    if method == "dtop":
        return [(f"p0={t}", {"threshold": t}) for t in thresholds] if task == "seg" else []
    extra = {"overflow": "redistribute"} if method == "holov" else {}  # equal counts: the cls head takes a mean
    return [(f"budget={k}", {"budget": k, "boundary_layer": LAYER, **extra}) for k in budgets]


def evaluate(task: str = "cls", images: int = 256, batch: int = 64, methods=METHODS, kind: str = "timm", seed: int = 0,
             log=print, budgets=BUDGETS, thresholds=THRESHOLDS) -> list[dict]:
    """The rows of ``task``: first the unwrapped model (``method="none"``), then one per method and
    setting (:func:`settings`), each wrapped run from ``torch.manual_seed(seed)`` and timed against
    the unwrapped model run right before on the same batches."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods must be among {METHODS}, got {unknown}")
    if batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    model = load_vit(kind=kind, head=task)
    data = Task(task, images, batch)
    metrics, speed, flops, kept = _run(model, data)
    timed = len(data.batches) - 1
    base = {"task": task, "method": "none", "setting": "", "tokens_kept": kept, "images": images, **metrics,
            "gflops": sum(flops) / len(flops), "images_per_s": speed, "speed_ratio": 1.0, "timed_batches": timed}
    rows = [base]
    log(base)
    for method in methods:
        for label, options in settings(task, method, budgets, thresholds):
            # the better of two passes each way, right before and during the wrapped run: a burst
            # of load from other jobs on shared cores then hits neither figure alone
            reference = max(images_per_second(model, data.batches[1:]) for _ in range(2)) if timed else None
            torch.manual_seed(seed)
            with vlmprune.wrap(model, method, **options) as handle:
                metrics, speed, flops, kept = _run(model, data, handle)
                if timed:
                    speed = max(speed, images_per_second(model, data.batches[1:]))
            row = {"task": task, "method": method, "setting": label, "tokens_kept": kept, "images": images, **metrics,
                   "gflops": sum(flops) / len(flops), "images_per_s": speed,
                   "speed_ratio": speed / reference if reference else None, "timed_batches": timed}
            rows.append(row)
            log(row)
    return rows


def write(rows: list[dict], out: Path) -> None:
    """``results_<task>.json``, ``results_<task>.csv`` and the plot ``<task>_vs_gflops.png`` under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = rows[0]["task"]
    metric, label = ("both", "accuracy, colour and shape right") if task == "cls" else ("miou", "mIoU (4 classes)")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results_{task}.json").write_text(json.dumps(rows, indent=1))
    with open(out / f"results_{task}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    base = rows[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        pts = sorted((r["gflops"], r[metric]) for r in rows[1:] if r["method"] == method)
        ax.plot([g for g, _ in pts], [v for _, v in pts], marker="o", label=method,
                linestyle="--" if method in ("tome", "dtop") else "-")
    ax.scatter([base["gflops"]], [base[metric]], marker="*", s=150, color="black", label="unpruned", zorder=3)
    ax.set(xlabel="GFLOPs per image", ylabel=f"easyvqa-{task} {label}",
           title=f"embedded ViT-S/14, {base['images']} test images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out / f"{task}_vs_gflops.png", dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="cls", choices=TASKS, help="easyvqa-cls (accuracy) or easyvqa-seg (mIoU)")
    ap.add_argument("--images", type=int, default=256, help="first N easy-VQA test images (default 256)")
    ap.add_argument("--batch", type=int, default=64, help="images per forward (default 64)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--kind", default="timm", choices=("timm", "hf"), help="backbone port (default timm)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", type=Path, default=Path("assets/benchmark_vit"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = evaluate(args.task, args.images, args.batch, args.methods, kind=args.kind, seed=args.seed,
                    log=lambda r: print(json.dumps(r), flush=True))
    write(rows, args.out)


if __name__ == "__main__":
    main()
