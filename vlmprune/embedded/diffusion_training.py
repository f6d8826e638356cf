"""Train the embedded text-to-image model (``assets/embedded_diffusion``) on the CPU, seeded.

    python -m vlmprune.embedded.diffusion_training --seed 0

:class:`~vlmprune.embedded.diffusion.TextToImage` learns easy-VQA's train images (the 3,837 whose
colour and shape the questions settle, :func:`vlmprune.embedded.vit.cls_data`), area-downscaled
to 32 px (the UNet sees 2 x 2 pixel blocks as channels), from their captions ``"a <colour> <shape>"``: DDPM (diffusers ``DDPMScheduler``,
epsilon prediction, uniform timesteps, MSE), the caption replaced by the empty one with
probability ``--drop`` (classifier-free guidance), random left-right flips (easy-VQA's triangles
point up, so not upside down), AdamW with a linear warm-up and a cosine decay over ``--steps``
steps of ``--batch`` images, an exponential moving average of the weights (``--ema``, with the
usual ``(1 + n) / (10 + n)`` warm-up) which is what ships. A checkpoint (model, EMA, optimiser,
generator) goes to ``<cache>/diffusion-train/`` every ``--every`` steps and a rerun of the same
command resumes from it (``--minutes`` stops early, at a time budget). The weights (fp16), ``config.json``, ``training.json`` (command, args,
minutes, machine, losses) go to ``--out``. One thread by default.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import diffusion
from .model import cache_root


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def dataset(split: str, size: int, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixels [M, 3, size, size] in [-1, 1], caption ids [M, 3])`` of ``split``."""
    from . import vit

    _, images, colour, shape = vit.cls_data(split, n)
    pairs = [(diffusion.COLORS[c], diffusion.SHAPES[s]) for c, s in zip(colour.tolist(), shape.tolist())]
    return diffusion.to_pixels(images, size), diffusion.caption_ids(pairs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmprune.embedded.diffusion_training", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1200, help="optimiser steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--drop", type=float, default=0.1, help="probability of the empty caption (classifier-free guidance)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--minutes", type=float, default=None,
                   help="stop once training has taken this long (checkpoints' wall time; the learning rate schedule stays that of --steps)")
    p.add_argument("--every", type=int, default=100, help="checkpoint every this many steps")
    p.add_argument("--n-train", type=int, default=None, help="the first N training images (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=None, help="checkpoints under this folder (default: $VLMPRUNE_CACHE or ~/.cache/vlmprune)")
    p.add_argument("--out", default=None, help="output folder (default: assets/embedded_diffusion)")
    p.add_argument("--config", default=None, help="JSON of DiffusionConfig fields to override (tests: a tiny UNet)")
    return p


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def saved_args(args) -> dict:
    """The arguments a checkpoint must share with the run resuming it (``--steps`` may grow: the
    cosine then stretches over the new length; ``--minutes`` may change)."""
    return {k: v for k, v in vars(args).items() if k not in ("threads", "out", "cache_dir", "steps", "minutes")}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = diffusion.DiffusionConfig(**json.loads(args.config or "{}"))
    x, ids = dataset("train", config.image_size, args.n_train)
    log(f"{len(x)} training images at {config.image_size} px")

    model = diffusion.TextToImage(config)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = model.scheduler("ddpm")
    generator = torch.Generator().manual_seed(args.seed)
    null = diffusion.caption_ids([""])[0]
    root = Path(args.cache_dir) if args.cache_dir else cache_root()
    ckpt_path = root / "diffusion-train" / f"seed{args.seed}.pt"
    step, losses, elapsed = 0, [], 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        if state["args"] != saved_args(args):
            raise SystemExit(f"checkpoint {ckpt_path} was made with other arguments: {state['args']}; delete it to start over")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        step, losses, elapsed = state["step"], state["losses"], state["elapsed"]
        log(f"resumed at step {step} ({elapsed / 60:.1f} min so far)")
    t0 = time.time() - elapsed
    model.train()
    window = []
    while step < args.steps and (args.minutes is None or time.time() - t0 < 60 * args.minutes):
        rows = torch.randint(0, len(x), (args.batch,), generator=generator)
        batch, cond = x[rows], ids[rows].clone()
        flip = torch.rand(args.batch, generator=generator) < 0.5
        batch = model.pack(torch.where(flip[:, None, None, None], batch.flip(-1), batch))
        cond[torch.rand(args.batch, generator=generator) < args.drop] = null
        noise = torch.randn(batch.shape, generator=generator)
        t = torch.randint(0, config.train_timesteps, (args.batch,), generator=generator)
        pred = model.unet(scheduler.add_noise(batch, noise, t), t, encoder_hidden_states=model.text(cond)).sample
        loss = F.mse_loss(pred, noise)
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step, args)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        window.append(loss.item())
        if step % args.every == 0 or step == args.steps:
            losses.append([step, sum(window) / len(window)])
            window = []
            elapsed = time.time() - t0
            log(f"step {step}/{args.steps} loss {losses[-1][1]:.4f} lr {lr_at(step - 1, args):.2e} {elapsed / 60:.1f} min")
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimiser": optimiser.state_dict(),
                        "generator": generator.get_state(), "step": step, "losses": losses, "elapsed": elapsed,
                        "args": saved_args(args)}, ckpt_path)
    minutes = (time.time() - t0) / 60
    record = {
        "command": parser.prog + " " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args), "train_minutes": round(minutes, 1), "steps_done": step, "n_train": len(x), "losses": losses,
        "threads": args.threads, "machine": platform.machine(), "processor": platform.processor(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": __import__("diffusers").__version__},
    }
    out = Path(args.out) if args.out else diffusion.diffusion_path()
    ema.save(out, record)
    log(f"wrote {out} after {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
