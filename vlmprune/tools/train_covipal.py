"""Train CoViPAL's Plug-and-Play Pruning Module (PPM) on the embedded model, on CPU, in minutes.

    python -m vlmprune.tools.train_covipal --cache-dir /tmp/embcache

writes ``assets/covipal_embedded.safetensors`` (``--out``), which
``vlmprune.wrap(model, "covipal", budget=...)`` loads by default on the embedded model.

1. **Data**: ``--plain`` easy-VQA train images and ``--grid`` easyvqa-grid train mosaics (seeded),
   up to ``--max-q`` questions each, with the cached vision features of
   ``vlmprune train-embedded`` (``<cache>/embedded-features``, read only).
2. **Teacher** (the LVLM is frozen): one packed forward per image (all its questions share the
   image prefix, exactly), on eager attention through the model's own modules
   (:class:`vlmprune.embedded.harness.FrozenLM`); the target of a question is the head-mean
   attention that every question token (``--teacher-query text``, default: the card leaves
   the query rows [unverified], and on the embedded model these targets make a far better
   pruner, 91.7 % against 70.3 % at 64 tokens on the held-out slice; ``last``: the last prompt
   token only) pays, averaged, the 256 visual tokens at the deep layer ``l_g``
   (``--teacher-layer``, default ``3/4`` of the depth, i.e. 3 of 4), renormalised over them.
3. **Stage 1, attention-guided distillation**: the PPM reads the projected visual tokens and the
   prompt's text embeddings (exactly the ``projected`` and ``text_embedding`` signals at
   inference) and is trained with ``KL(target || softmax(logits))``, AdamW.
4. **Stage 2** (the card marks it [unverified]; off by default, ``--stage2-steps``): the LM loss of
   the pruned model on the answer word, LVLM frozen, the PPM's top-k made differentiable as a soft
   key mask ``log sigmoid((s - s_k) / tau)`` applied inside every layer's attention.
5. **Report** on held-out test images (easy-VQA and easyvqa-grid): KL, top-k overlap with the
   teacher at ``r = 0.25`` and ``0.125``, and answer-word accuracy (the greedy first answer token)
   with all tokens, the PPM's top-k, the teacher's own top-k (an oracle) and a uniform grid of the
   same size, each pruned at the LLM input with original positions (a hard key mask in every
   layer, which is exactly dropping them).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys

import torch

from vlmprune.embedded.harness import (
    Batcher,
    Clock,
    FrozenLM,
    add_run_arguments,
    hard_key_mask,
    load_groups,
    log,
    model_path,
    pad_right,
    save_trained,
    start_run,
    training_record,
)
from vlmprune.methods.covipal import (
    EMBEDDED_WEIGHTS,
    PPM,
    distill_loss,
    file_digest,
    topk_overlap,
)
from vlmprune.primitives.selection import uniform_grid


def teacher_targets(lm: FrozenLM, batcher: Batcher, groups, layer: int, query: str, batch_images: int):
    """Per question: (group index, text ids, target [256]); computed with packed forwards."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(groups), batch_images):
            chunk = groups[s : s + batch_images]
            b = batcher.packed(chunk)
            _, probs = lm.run(b, keep_probs=(layer,))
            p = probs[layer].mean(1)  # [B, L, L]
            rows, cols = b.query
            vis = b.visual
            k = 0
            for g, items in enumerate(chunk):
                for it in items:
                    r, c = int(rows[k]), int(cols[k])
                    n_q = len(batcher.prompt_ids(it.question))
                    qrows = torch.arange(c - n_q + 1, c + 1) if query == "text" else torch.tensor([c])
                    t = p[r, qrows][:, vis].mean(0)
                    out.append((s + g, it, t / t.sum()))
                    k += 1
    return out


def text_batch(lm: FrozenLM, batcher: Batcher, items):
    """Text embeddings ``[B, T, D]`` and mask of ``<s>`` + each question (the ``text_embedding``
    signal: every non-image prompt token)."""
    x, m = pad_right([[batcher.bos] + batcher.prompt_ids(it.question) for it in items], batcher.pad)
    with torch.no_grad():
        return lm.lm.embed_tokens(x), m


def projected(lm: FrozenLM, batcher: Batcher, groups) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([lm.projector(batcher.features.get(g[0].store, [g[0].index])) for g in groups])


@torch.no_grad()
def accuracy(lm: FrozenLM, batcher: Batcher, items, keep_fn=None, batch: int = 16) -> float:
    """Answer-word accuracy; ``keep_fn(batch, k0)`` -> ``[B, 256]`` bool keeps the visual tokens."""
    correct = 0
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        b = batcher(chunk)
        mask = None if keep_fn is None else hard_key_mask(b, keep_fn(chunk, s))
        logits, _ = lm.run(b, at_layer=(lambda i, p, h: mask if i == 0 else None) if mask is not None else None)
        correct += int((logits.argmax(-1) == b.answers).sum())
    return correct / max(len(items), 1)


def keep_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(1, scores.topk(k, -1).indices, True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmprune.tools.train_covipal", description=__doc__.split("\n\n")[0])
    add_run_arguments(p, EMBEDDED_WEIGHTS)
    p.add_argument("--plain", type=int, default=200, help="easy-VQA train images (default 200)")
    p.add_argument("--grid", type=int, default=200, help="easyvqa-grid train mosaics (default 200)")
    p.add_argument("--max-q", type=int, default=8, help="questions per image (default 8)")
    p.add_argument("--test-plain", type=int, default=48, help="held-out easy-VQA test images (2 questions each)")
    p.add_argument("--test-grid", type=int, default=48, help="held-out easyvqa-grid test mosaics (2 questions each)")
    p.add_argument("--teacher-layer", type=int, default=None, help="deep LLM layer l_g (default: 3/4 of the depth)")
    p.add_argument("--teacher-query", choices=("last", "text"), default="text",
                   help="teacher rows: every question token (default) or the last prompt token")
    p.add_argument("--width", type=int, default=128, help="PPM width d' (default 128)")
    p.add_argument("--blocks", type=int, default=1, help="PPM transformer blocks (default 1)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=500, help="stage-1 steps (default 500)")
    p.add_argument("--batch", type=int, default=32, help="questions per stage-1 step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--stage2-steps", type=int, default=0, help="stage-2 steps (LM loss through a soft top-k mask; default 0: off)")
    p.add_argument("--stage2-ratio", type=float, default=0.25, help="keep ratio r of stage 2")
    p.add_argument("--stage2-tau", type=float, default=0.5, help="soft top-k temperature (logit units)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    clock = Clock()
    run = start_run(args.cache_dir, args.threads, args.seed, args.model, args.out)
    if run is None:
        return 2
    model, processor, lm, features, batcher = run
    depth = model.config.text_config.num_hidden_layers
    layer = args.teacher_layer if args.teacher_layer is not None else depth * 3 // 4
    if not 0 <= layer < depth:
        print(f"error: --teacher-layer must be in [0, {depth - 1}], got {layer}", file=sys.stderr)
        return 2
    train = load_groups(features, "train", args.plain, args.grid, args.max_q, args.seed)
    test = load_groups(features, "test", args.test_plain, args.test_grid, 2, args.seed + 1)
    batcher.check_against_processor(processor, train[0][0].question)
    n_train = sum(map(len, train))
    log(f"[{clock():.0f}s] data: {len(train)} train images, {n_train} questions; {len(test)} test images, {sum(map(len, test))} questions")
    diff = lm.check(batcher([train[0][0], train[1][0]]))
    log(f"[{clock():.0f}s] frozen-LM path vs the model's forward: max |dlogit| = {diff:.2e}")

    # teacher targets (packed forwards, LVLM frozen)
    t_train = teacher_targets(lm, batcher, train, layer, args.teacher_query, 8)
    t_test = teacher_targets(lm, batcher, test, layer, args.teacher_query, 8)
    vis_train, vis_test = projected(lm, batcher, train), projected(lm, batcher, test)
    log(f"[{clock():.0f}s] teacher: layer {layer} ({args.teacher_query} rows), {len(t_train)} train / {len(t_test)} test targets; "
        f"{features.computed} feature rows computed (not cached)")

    dim = model.config.text_config.hidden_size
    ppm = PPM(dim, width=args.width, heads=args.heads, blocks=args.blocks, seed=args.seed)
    ppm.train()
    opt = torch.optim.AdamW(ppm.parameters(), lr=args.lr, weight_decay=0.01)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / max(args.steps, 1))))
    rng = random.Random(args.seed)

    def ppm_scores(targets, vis, idx, grad=True):
        chosen = [targets[i] for i in idx]
        text, tmask = text_batch(lm, batcher, [c[1] for c in chosen])
        v = vis[[c[0] for c in chosen]]
        with torch.set_grad_enabled(grad):
            return ppm(v, text, tmask), torch.stack([c[2] for c in chosen])

    def evaluate(targets, vis):
        ppm.eval()
        kl, ov25, ov125 = [], [], []
        with torch.no_grad():
            for s in range(0, len(targets), 64):
                logits, tgt = ppm_scores(targets, vis, range(s, min(s + 64, len(targets))), grad=False)
                kl.append(distill_loss(logits, tgt) * logits.shape[0])
                ov25.append(topk_overlap(logits, tgt, 64).sum())
                ov125.append(topk_overlap(logits, tgt, 32).sum())
        ppm.train()
        n = len(targets)
        return float(sum(kl) / n), float(sum(ov25) / n), float(sum(ov125) / n)

    log(f"[{clock():.0f}s] PPM: {ppm.n_parameters():,} parameters (width {args.width}, {args.blocks} block(s))")
    for step in range(args.steps):
        idx = [rng.randrange(len(t_train)) for _ in range(args.batch)]
        logits, tgt = ppm_scores(t_train, vis_train, idx)
        loss = distill_loss(logits, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            kl, o25, o125 = evaluate(t_test, vis_test)
            log(f"[{clock():.0f}s] stage 1 step {step:4d}  train KL {loss.item():.4f}  test KL {kl:.4f}  "
                f"test top-64 overlap {o25:.3f}  top-32 overlap {o125:.3f}")

    # stage 2 (optional): LM loss through a soft top-k key mask, LVLM frozen
    flat_train = [it for g in train for it in g]
    group_of = {id(it): gi for gi, g in enumerate(train) for it in g}
    if args.stage2_steps:
        opt2 = torch.optim.AdamW(ppm.parameters(), lr=args.lr * 0.25)
        k = max(1, round(args.stage2_ratio * 256))
        for step in range(args.stage2_steps):
            chunk = [flat_train[rng.randrange(len(flat_train))] for _ in range(8)]
            b = batcher(chunk)
            text, tmask = text_batch(lm, batcher, chunk)
            scores = ppm(vis_train[[group_of[id(it)] for it in chunk]], text, tmask)
            top = scores.detach().topk(k + 1, -1).values
            thr = 0.5 * (top[:, k - 1] + top[:, k])
            soft = torch.nn.functional.logsigmoid((scores - thr[:, None]) / args.stage2_tau)
            mask = torch.zeros(b.ids.shape)
            mask = mask.index_put((torch.arange(mask.shape[0])[:, None], torch.arange(1, 257)[None]), soft)
            logits, _ = lm.run(b, at_layer=lambda i, p, h: mask if i == 0 else None)
            loss = torch.nn.functional.cross_entropy(logits, b.answers)
            opt2.zero_grad()
            loss.backward()
            opt2.step()
            if step % 20 == 0 or step == args.stage2_steps - 1:
                log(f"[{clock():.0f}s] stage 2 step {step:4d}  LM loss {float(loss):.4f}")
    ppm.eval()
    kl, o25, o125 = evaluate(t_test, vis_test)

    # held-out accuracy with the LLM on the pruned visual tokens
    test_items = [it for g in test for it in g]
    test_group = {id(it): gi for gi, g in enumerate(test) for it in g}
    teacher_of = {id(t[1]): t[2] for t in t_test}

    def ppm_keep(k):
        def fn(chunk, _):
            text, tmask = text_batch(lm, batcher, chunk)
            with torch.no_grad():
                s = ppm(vis_test[[test_group[id(it)] for it in chunk]], text, tmask)
            return keep_topk(s, k)
        return fn

    def teacher_keep(k):
        return lambda chunk, _: keep_topk(torch.stack([teacher_of[id(it)] for it in chunk]), k)

    def grid_keep(k):
        g = uniform_grid(16, 16, k)
        return lambda chunk, _: torch.zeros(len(chunk), 256, dtype=torch.bool).index_fill_(1, g, True)

    acc = {"all 256": accuracy(lm, batcher, test_items)}
    for k in (64, 32):
        acc[f"covipal {k}"] = accuracy(lm, batcher, test_items, ppm_keep(k))
        acc[f"teacher top-{k} (oracle)"] = accuracy(lm, batcher, test_items, teacher_keep(k))
        acc[f"uniform grid {k}"] = accuracy(lm, batcher, test_items, grid_keep(k))
    log(f"[{clock():.0f}s] held-out ({len(test_items)} questions): KL {kl:.4f}, top-64 overlap {o25:.3f}, top-32 overlap {o125:.3f}")
    for name, a in acc.items():
        log(f"    answer accuracy, {name:28s} {a:.3f}")

    ckpt = model_path(args.model) / "model.safetensors"
    heldout = {"questions": len(test_items), "kl": kl, "top64_overlap": o25, "top32_overlap": o125, "accuracy": acc}
    info = training_record(
        parser, argv, args, clock, teacher_layer=layer, checkpoint_sha256=file_digest(ckpt) if ckpt.is_file() else None,
        train_questions=n_train, heldout=heldout,
    )
    save_trained(ppm, args.out, EMBEDDED_WEIGHTS, info, clock)
    print(json.dumps(info["heldout"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
