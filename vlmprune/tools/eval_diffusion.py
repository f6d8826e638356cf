"""``vlmprune eval --task easyvqa-t2i`` (= ``python -m vlmprune.tools.eval_diffusion``): the embedded
text-to-image model (``assets/embedded_diffusion``, :mod:`vlmprune.embedded.diffusion`) sampled
with its UNet wrapped, judged by the embedded VQA model.

The judge (:class:`Judge`): the embedded LLaVA (:func:`vlmprune.embedded.load_embedded`) asked
``"what color is the shape?"`` and ``"what shape is in the image?"`` (two of easy-VQA's training
templates) of every image, upscaled from 32 px to its 224 px input (bicubic, its processor's
resampling); an image is consistent with its caption when both answers match it. Its accuracy on
real test images passed through the same resolution (area-downscaled to 32 px) is measured first
(``--real``, written to ``judge_real.json``, which a later run with ``--real 0`` reports) and
reported with the results.

Samples: ``--samples`` images per method, the caption of sample ``i`` the ``i % 24``-th of the 24
``"a <colour> <shape>"`` captions, its noise drawn from a generator seeded ``--seed`` (the same for
every method), DDIM with ``--steps`` steps, guidance ``--guidance`` and the model's eta (defaults
from the model's config; at eta > 0 each batch's step noise is seeded too, the same for every
method). The
methods (:data:`RUNS`): the full (unwrapped) UNet, ToMeSD and OptiPrune's SimPrune at 30/50/70 %
of each highest-resolution block's tokens removed (their defaults otherwise: self-attention
only, ``max_downsample=1``), and LatentMapper (its defaults, on the SimPrune-50 % UNet: pruned
forwards) + SimPrune 50 %. After an untimed 2-step warm-up of every method, batches run in
turn through every method (one wrap, one session per batch), so a loaded machine slows all rows
alike; each row's time is its sampling seconds
(LatentMapper's optimisation included), the ratio is to the unwrapped UNet's in the same run. The
transformer blocks' FLOPs per step come from the adapter's ``cost()``. Writes ``results.json``,
``table.md``, ``consistency_vs_ratio.png`` and ``samples.png`` (rows: methods, columns: the first
``--grid`` samples) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from PIL import Image

import vlmprune
from vlmprune.embedded import diffusion
from vlmprune.eval.easyvqa import COLORS, SHAPES

OUT = Path(__file__).resolve().parents[2] / "assets" / "benchmark_diffusion"
TASK = "easyvqa-t2i"
#: (row name, method or None: unwrapped, options, LatentMapper first)
RUNS = (
    ("full", None, {}, False),
    *((f"tomesd {int(r * 100)}%", "tomesd", {"ratio": r}, False) for r in (0.3, 0.5, 0.7)),
    *((f"simprune {int(r * 100)}%", "optiprune", {"ratio": r}, False) for r in (0.3, 0.5, 0.7)),
    ("latentmapper + simprune 50%", "optiprune", {"ratio": 0.5}, True),
)
REAL = "judge_real.json"
CAPTIONS = tuple((c, s) for c in COLORS for s in SHAPES)
COLOR_QUESTION = "what color is the shape?"
SHAPE_QUESTION = "what shape is in the image?"


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


class Judge:
    """The embedded VQA model as the judge of a generated image's colour and shape."""

    def __init__(self, model=None, processor=None, batch: int = 32):
        from vlmprune.embedded import load_embedded
        from vlmprune.eval.runner import Predictor

        if model is None:
            model, processor = load_embedded()
        processor.tokenizer.padding_side = "left"
        self.predictor = Predictor(model, processor, post_prompt=None, max_new_tokens=1)  # the answers are one token each
        self.size = processor.image_processor.size["height"]
        self.batch = batch

    def upscale(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)

    def __call__(self, images: list[Image.Image]) -> list[tuple[str, str]]:
        """``(colour, shape)`` answered for each image (the answer's first word)."""
        from .eval_reach import VisionMemo

        big = [self.upscale(im) for im in images]
        out = []
        for i in range(0, len(big), self.batch):
            chunk = big[i : i + self.batch]
            with VisionMemo(self.predictor.model):  # the two questions share the images' tower output
                colours, _ = self.predictor.generate(chunk, [COLOR_QUESTION] * len(chunk))
                shapes, _ = self.predictor.generate(chunk, [SHAPE_QUESTION] * len(chunk))
            out += [(_first(c), _first(s)) for c, s in zip(colours, shapes)]
        return out


def _first(answer: str) -> str:
    words = answer.strip().lower().split()
    return words[0].strip(".,") if words else ""


def scores(answers: list[tuple[str, str]], captions: list[tuple[str, str]]) -> dict[str, float]:
    """Colour, shape and both (consistency) right, as fractions of the images."""
    n = len(captions)
    colour = sum(a[0] == c[0] for a, c in zip(answers, captions)) / n
    shape = sum(a[1] == c[1] for a, c in zip(answers, captions)) / n
    both = sum(a == c for a, c in zip(answers, captions)) / n
    return {"consistency": both, "colour": colour, "shape": shape}


def real_accuracy(judge: Judge, n: int | None, size: int) -> dict:
    """The judge on real easy-VQA test images (the first ``n`` of :func:`vit.cls_data`), at full
    resolution and through ``size`` px."""
    from vlmprune.embedded import vit

    _, images, colour, shape = vit.cls_data("test", n)
    truth = [(COLORS[c], SHAPES[s]) for c, s in zip(colour.tolist(), shape.tolist())]
    low = diffusion.to_images(diffusion.to_pixels(images, size))
    return {"images": len(images), "at_64px": scores(judge(images), truth), f"at_{size}px": scores(judge(low), truth)}


def mapped_noise(model, captions, noise, steps: int):
    """LatentMapper's optimised initial ``noise`` for ``captions`` (its defaults, at the first of
    ``steps`` DDIM timesteps), from forwards of ``model.unet`` as it is wrapped (pruned forwards)."""
    from vlmprune.methods.optiprune import LatentMapper

    scheduler = model.scheduler("ddim")
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        context = model.text(diffusion.caption_ids(captions))
    latents, _ = LatentMapper(subjects=diffusion.SUBJECTS).map(model.unet, noise, scheduler.timesteps[0], context)
    return latents


def sample_batch(model, run, captions, noise, steps, guidance, step_seed: int):
    """``(images in [-1, 1], seconds, stats)`` of one batch under ``run``: the initial ``noise``
    and the sampler's step noise (seeded by ``step_seed``) are the same for every run."""
    _, method, options, mapper = run
    steps_noise = torch.Generator().manual_seed(step_seed)
    if method is None:
        t = time.perf_counter()
        x = model.sample(captions, latents=noise, steps=steps, guidance=guidance, generator=steps_noise)
        return x, time.perf_counter() - t, {}
    with vlmprune.wrap(model.unet, method, **options) as handle:
        t = time.perf_counter()
        latents = mapped_noise(model, captions, noise, steps) if mapper else noise
        x = model.sample(captions, latents=latents, steps=steps, guidance=guidance, generator=steps_noise)
        seconds = time.perf_counter() - t
        stats = handle.stats
    return x, seconds, stats


def run_benchmark(model, judge: Judge, samples: int, batch: int, seed: int, steps: int | None, guidance: float | None,
                  runs=RUNS) -> tuple[list[dict], dict[str, list[Image.Image]]]:
    """One row per run and each run's images (in sample order)."""
    steps = steps or model.config.steps
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(samples)]
    images = {r[0]: [] for r in runs}
    seconds = {r[0]: 0.0 for r in runs}
    flops = {r[0]: [] for r in runs}
    for run in runs:  # warm-up, untimed: first calls (imports, allocations) land on no row
        sample_batch(model, run, captions[:1], model.noise(1, torch.Generator().manual_seed(seed)), 2, guidance, seed)
    for start in range(0, samples, batch):
        chunk = captions[start : start + batch]
        noise = model.noise(len(chunk), torch.Generator().manual_seed(seed * 100003 + start))
        for run in runs:
            x, s, stats = sample_batch(model, run, chunk, noise, steps, guidance, seed * 100003 + start + 1)
            images[run[0]] += diffusion.to_images(x)
            seconds[run[0]] += s
            if "transformer_flops" in stats:
                flops[run[0]].append(stats["transformer_flops"] / stats["transformer_flops_unpruned"])
        log(f"sampled {min(start + batch, samples)}/{samples} per method")
    rows = []
    for name, method, options, mapper in runs:
        row = {"method": name, "wrap": method, "options": options, "latentmapper": mapper, "samples": samples,
               **scores(judge(images[name]), captions),
               "seconds": round(seconds[name], 2), "time_ratio": round(seconds[name] / seconds[runs[0][0]], 3),
               "transformer_flops_ratio": round(sum(flops[name]) / len(flops[name]), 4) if flops[name] else 1.0}
        rows.append(row)
        log(f"{name}: consistency {row['consistency']:.3f} colour {row['colour']:.3f} shape {row['shape']:.3f} "
            f"time x{row['time_ratio']:.2f}")
    return rows, images


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | consistency | colour | shape | sampling s | time vs full | transformer FLOPs vs full |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {100 * r['consistency']:.1f} | {100 * r['colour']:.1f} | {100 * r['shape']:.1f} | "
                     f"{r['seconds']:.1f} | {r['time_ratio']:.2f} | {r['transformer_flops_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    full = next(r for r in rows if r["wrap"] is None)
    for label, method, mapper, marker in (("ToMeSD", "tomesd", False, "o-"), ("SimPrune", "optiprune", False, "s-")):
        part = [r for r in rows if r["wrap"] == method and r["latentmapper"] == mapper]
        ratios = [0.0] + [r["options"]["ratio"] for r in part]
        a.plot(ratios, [100 * full["consistency"]] + [100 * r["consistency"] for r in part], marker, label=label)
        b.plot(ratios, [1.0] + [r["time_ratio"] for r in part], marker, label=label)
    for r in rows:
        if r["latentmapper"]:
            a.plot([r["options"]["ratio"]], [100 * r["consistency"]], "k*", markersize=12, label="LatentMapper + SimPrune")
            b.plot([r["options"]["ratio"]], [r["time_ratio"]], "k*", markersize=12, label="LatentMapper + SimPrune")
    a.set(xlabel="fraction of tokens removed", ylabel="consistency (%)", title="prompt-image consistency (VQA judge)")
    b.set(xlabel="fraction of tokens removed", ylabel="sampling time / full", title="sampling time vs unwrapped")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def grid(images: dict[str, list[Image.Image]], captions: list[tuple[str, str]], columns: int, path: Path, scale: int = 2) -> None:
    """Rows: methods (labelled), columns: the first ``columns`` samples (captions on top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(images)
    fig, axes = plt.subplots(len(names), columns, figsize=(0.9 * columns + 2, 0.9 * len(names) + 0.4), squeeze=False)
    for i, name in enumerate(names):
        for j in range(columns):
            ax = axes[i][j]
            im = images[name][j]
            ax.imshow(im.resize((im.width * scale, im.height * scale), Image.NEAREST))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(" ".join(captions[j]), fontsize=7)
            if j == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmprune.tools.eval_diffusion", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default=TASK, choices=(TASK,))
    p.add_argument("--model", default=None, help="an embedded_diffusion folder (default assets/embedded_diffusion)")
    p.add_argument("--judge", default=None, help="an embedded VQA folder (default assets/embedded_vlm)")
    p.add_argument("--samples", type=int, default=48, help="images per method (default 48: each caption twice; 0: only --real)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--real", type=int, default=None,
                   help="real test images for the judge's accuracy, written to judge_real.json (default all; 0: skip, "
                        "and report the judge_real.json of --out if there is one)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--grid", type=int, default=12, help="sample columns in samples.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = diffusion.load_diffusion(args.model) if args.samples else None
    size = model.config.image_size if model is not None else diffusion.DiffusionConfig().image_size
    if args.judge is None:
        judge = Judge()
    else:
        from vlmprune.embedded import load_embedded

        judge = Judge(*load_embedded(args.judge))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    real = None
    if args.real != 0:
        real = real_accuracy(judge, args.real, size)
        real["command"] = "python -m vlmprune.tools.eval_diffusion " + " ".join(sys.argv[1:] if argv is None else argv)
        (out / REAL).write_text(json.dumps(real, indent=1) + "\n")
        log(f"judge on {real['images']} real test images: {real}")
    elif (out / REAL).exists():
        real = json.loads((out / REAL).read_text())
    if args.samples == 0:
        return 0
    rows, images = run_benchmark(model, judge, args.samples, args.batch, args.seed, args.steps, args.guidance)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.samples)]
    record = {
        "task": TASK, "command": "python -m vlmprune.tools.eval_diffusion " + " ".join(sys.argv[1:] if argv is None else argv),
        "judge_real": real, "steps": args.steps or model.config.steps,
        "guidance": model.config.guidance if args.guidance is None else args.guidance, "threads": args.threads,
        "machine": platform.machine(), "minutes": round((time.time() - t0) / 60, 1), "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "table.md").write_text(markdown_table(rows))
    plot(rows, out / "consistency_vs_ratio.png")
    grid(images, captions, min(args.grid, args.samples), out / "samples.png")
    log(f"wrote {out} in {record['minutes']} min")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
