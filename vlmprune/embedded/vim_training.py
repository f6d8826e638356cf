"""Train the embedded Vim (``assets/embedded_vim``) from scratch on easyvqa-cls, on the CPU, seeded.

    python -m vlmprune.embedded.vim_training --seed 0

:class:`~vlmprune.embedded.vim_model.VimClassifier` (64 px easy-VQA images, 8 px patches: 64
patches + a middle class token) learns the image's colour x shape (24 classes,
:func:`~vlmprune.embedded.vim_model.label_of`) on the train split of
:func:`vlmprune.embedded.vit.cls_data`; AdamW, cosine learning rate, batch 64. Every epoch is
checkpointed under ``<cache>/embedded-vim/`` (model, optimiser, generator states) and a rerun of
the same command resumes from the last one. ``--flip`` flips each training image left-right with probability 1/2
every epoch (colour and shape unchanged; the distillation targets flip with it; not upside down:
easy-VQA's triangles always point up). ``--init DIR`` starts from a trained Vim saved in ``DIR``
(this command's ``--out`` of an earlier run; its ``training.json`` is kept under ``"init"``), with
the distillation map first fitted to it by least squares. ``--distil W`` adds W times a dense distillation loss:
a training-only linear map of the Vim's final patch tokens regresses the embedded ViT-S/14's
final-norm patch tokens (``vlmprune.embedded.vit_training``'s feature cache, 16 x 16 averaged to
8 x 8, standardised per channel); the cache must have been filled by that command. Training stops after ``--epochs`` or once the test
accuracy reaches ``--stop-at``; the weights, ``config.json``, ``training.json`` (figures, command,
time) and ``README.md`` go to ``--out``. One thread by default (``--threads``): unpinned, torch
spreads a small Mamba's scan over every core of a shared machine and runs far slower.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import vim_model, vit
from .model import cache_root

#: the architecture trained here (:class:`~vlmprune.embedded.vim_model.VimConfig`)
ARCH = {"image_size": 64, "patch_size": 8, "d_model": 48, "depth": 6, "d_state": 8, "num_classes": len(vit.COLORS) * len(vit.SHAPES)}


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def pixels(images) -> torch.Tensor:
    """easy-VQA images -> ``[B, 3, 64, 64]`` (ImageNet mean/std, :func:`vit.preprocess`)."""
    return vit.preprocess(images, size=ARCH["image_size"])


def dataset(split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixels, labels)`` of ``split`` (:func:`vit.cls_data`)."""
    _, images, colour, shape = vit.cls_data(split, n)
    return pixels(images), vim_model.label_of(colour, shape, len(vit.SHAPES))


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 128) -> dict[str, float]:
    """Accuracy of ``model`` on ``(x, y)``: both labels (the class), colour and shape alone."""
    model.eval()
    pred = torch.cat([model(x[i : i + batch]).argmax(-1) for i in range(0, len(x), batch)])
    s = len(vit.SHAPES)
    return {
        "both": float((pred == y).float().mean()),
        "colour": float((pred // s == y // s).float().mean()),
        "shape": float((pred % s == y % s).float().mean()),
    }


def teacher_tokens(split: str, n: int | None) -> torch.Tensor:
    """``[M, 64, 384]`` float16: the embedded ViT's final-norm patch tokens of ``split`` (the cached
    16 x 16 grid averaged over 2 x 2 cells), standardised per channel with the split's statistics."""
    from .model import cache_root as root
    from .vit_training import open_caches

    cache = open_caches(root() / "embedded-vit-features", (5, 7, 11))[split]
    if not cache.done.all():
        raise RuntimeError(f"the embedded ViT feature cache of {split!r} is incomplete: run python -m vlmprune.embedded.vit_training first")
    rows = list(range(len(cache.ids) if n is None else n))
    out = []
    for i in range(0, len(rows), 256):
        t = cache.tokens(11, rows[i : i + 256])[:, 1:]  # [b, 256, 384]
        g = t.view(-1, 16, 16, t.shape[-1]).permute(0, 3, 1, 2)
        out.append(F.avg_pool2d(g, 2).flatten(2).transpose(1, 2))  # [b, 64, 384]
    t = torch.cat(out)
    mean, std = t.mean((0, 1)), t.std((0, 1)).clamp(min=1e-3)
    return ((t - mean) / std).half()


def random_flips(x: torch.Tensor, target: torch.Tensor | None, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flip each image of ``x`` ``[B, 3, H, W]`` left-right with probability 1/2 (drawn from ``gen``);
    ``target`` ``[B, g * g, C]`` (patch tokens on a g x g grid, row-major) flips with its image."""
    rows = torch.rand(len(x), generator=gen) < 0.5
    x = x.clone()
    x[rows] = x[rows].flip(3)
    if target is None:
        return x, None
    g = int(target.shape[1] ** 0.5)
    grid = target.view(len(target), g, g, -1).clone()
    grid[rows] = grid[rows].flip(2)
    return x, grid.flatten(1, 2)


@torch.no_grad()
def fit_probe(probe: torch.nn.Linear, model, x: torch.Tensor, teacher: torch.Tensor, batch: int = 256) -> None:
    """Set ``probe`` to the least-squares map (with bias) of ``model``'s final patch tokens on ``x``
    onto ``teacher`` (so a run from a trained Vim does not start from a random distillation map)."""
    model.eval()
    feats = torch.cat([final_patches(model, x[i : i + batch])[1] for i in range(0, len(x), batch)]).flatten(0, 1)
    feats = torch.cat([feats, torch.ones(len(feats), 1)], 1)
    solution = torch.linalg.lstsq(feats, teacher.flatten(0, 1).float()).solution  # [D + 1, C]
    probe.weight.copy_(solution[:-1].T)
    probe.bias.copy_(solution[-1])
    model.train()


def final_patches(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the final-norm patch tokens ``[B, M, D]``) of one forward of ``model``."""
    seq = model.norm_f(model.backbone(model.embed(x)))
    c = model.cls_index
    return model.head(seq[:, c]), torch.cat([seq[:, :c], seq[:, c + 1 :]], 1)


def train(args) -> dict:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    ckpt_dir = Path(args.cache) if args.cache else cache_root() / "embedded-vim"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / f"seed{args.seed}{f'-distil{args.distil:g}' if args.distil else ''}{'-flip' if args.flip else ''}-e{args.epochs}{'-init' if args.init else ''}.pt"
    xtr, ytr = dataset("train", args.n_train)
    xte, yte = dataset("test")
    log(f"data: {len(xtr)} train, {len(xte)} test images")
    model = vim_model.load_vim(args.init).train() if args.init else vim_model.VimClassifier(vim_model.VimConfig(**ARCH))
    params = list(model.parameters())
    if args.distil:
        teacher = teacher_tokens("train", args.n_train)
        probe = torch.nn.Linear(ARCH["d_model"], teacher.shape[-1])  # training only, not saved with the model
        if args.init:
            fit_probe(probe, model, xtr, teacher)
        params += list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = (len(xtr) + args.batch - 1) // args.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    state = {"epoch": 0, "seconds": 0.0, "history": []}
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        if args.distil:
            probe.load_state_dict(saved["probe"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        gen.set_state(saved["gen"])
        state = saved["state"]
        log(f"resumed from {ckpt} after epoch {state['epoch']}")
    while state["epoch"] < args.epochs and not (state["history"] and state["history"][-1]["test"]["both"] >= args.stop_at):
        started = time.time()
        model.train()
        order = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for i in range(0, len(xtr), args.batch):
            idx = order[i : i + args.batch]
            x = xtr[idx]
            target = teacher[idx].float() if args.distil else None
            if args.flip:
                x, target = random_flips(x, target, gen)
            if args.distil:
                logits, patches = final_patches(model, x)
                loss = F.cross_entropy(logits, ytr[idx]) + args.distil * F.mse_loss(probe(patches), target)
            else:
                loss = F.cross_entropy(model(x), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        test = accuracy(model, xte, yte)
        state["epoch"] += 1
        state["seconds"] += time.time() - started
        state["history"].append({"epoch": state["epoch"], "loss": total / len(xtr), "test": test})
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "gen": gen.get_state(), "state": state, **({"probe": probe.state_dict()} if args.distil else {})}, ckpt)
        log(f"epoch {state['epoch']}: loss {total / len(xtr):.4f} test {test} ({state['seconds'] / 60:.1f} min)")
    model.eval()
    result = {
        "seed": args.seed,
        "distil": args.distil,
        "flip": args.flip,
        "lr": args.lr,
        **({"init": json.loads((Path(args.init) / "training.json").read_text())} if args.init else {}),
        "epochs": state["epoch"],
        "train_minutes": round(state["seconds"] / 60, 1),
        "test": accuracy(model, xte, yte),
        "train": accuracy(model, xtr, ytr),
        "n_train": len(xtr),
        "n_test": len(xte),
        "threads": torch.get_num_threads(),
        "arch": ARCH,
        "command": "python -m vlmprune.embedded.vim_training " + shlex.join(sys.argv[1:]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "machine": f"{platform.machine()}",
    }
    out = Path(args.out)
    vim_model.save_vim(model, out)
    (out / "training.json").write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {out}: {result['test']}")
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--stop-at", type=float, default=0.98, help="stop once the test accuracy (both labels) reaches this")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--n-train", type=int, default=None, help="the first n train images (default: all)")
    p.add_argument("--distil", type=float, default=0.0, help="weight of the dense distillation from the embedded ViT (0: none)")
    p.add_argument("--flip", action="store_true", help="random left-right flips of the training images")
    p.add_argument("--init", default=None, help="start from the trained Vim saved in this directory (an earlier run's --out)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=None, help="checkpoint directory (default: <cache>/embedded-vim)")
    p.add_argument("--out", default=str(vim_model.ASSETS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return train(args)


if __name__ == "__main__":
    main()
