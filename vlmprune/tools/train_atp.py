"""Train ATP's instance-wise threshold heads on the embedded model, on CPU, in minutes.

    python -m vlmprune.tools.train_atp --cache-dir /tmp/embcache

writes ``assets/atp_embedded.safetensors`` (``--out``); ``vlmprune.wrap(model, "atp",
budget=..., weights=path)`` then uses the learned thresholds instead of ATP-TF's mass rule.

1. **Data**: ``--plain`` easy-VQA and ``--grid`` easyvqa-grid train questions (seeded), one
   question per sequence, with the cached vision features of ``vlmprune train-embedded``
   (``<cache>/embedded-features``, read only).
2. **Soft pruning** (the LVLM is frozen; :class:`vlmprune.embedded.harness.FrozenLM` runs its
   layers on eager attention with its own modules): before each ATP point ``K`` (those of
   ``ATP()``'s defaults on this model: 1, 2, 3 of 4) the scores of layer ``K - 1``
   (``S_self``: column means of the visual -> visual block; ``S_cross``: the last prompt token's
   row; head means, detached) give ``S_red`` (min-max normalised average) and the head's
   thresholds ``theta_r, theta_s`` from pooled statistics and the target ratio ``r``; the soft
   mask ``M = max(sigmoid((S_red - theta_r) tau), sigmoid((S_sp - theta_s) tau))`` multiplies
   the previous points' masks, and ``log M`` is added to every later layer's attention logits
   on those keys (nothing is removed).
3. **Loss**: cross-entropy of the answer word + ``--budget-weight`` x (mean soft kept fraction
   after the last point - r)^2, with ``r`` drawn per step from ``--ratios`` (one set of heads
   serves several budgets: ``r = budget / N`` is a head input). AdamW on the heads only.
4. **Report** on held-out test questions, with the method's own ``select()`` (hard decisions,
   tokens dropped as at inference: a hard key mask from the point on, original positions):
   answer-word accuracy and kept-token counts (mean per point, layer average, min/max) for
   ATP-TF and the learned heads at each ratio, and with all tokens.
"""

from __future__ import annotations

import argparse
import random
import sys

import torch

from vlmprune.context import ModelInfo, Signals, TokenContext
from vlmprune.embedded.harness import (
    Batch,
    Batcher,
    Clock,
    FrozenLM,
    add_run_arguments,
    load_items,
    log,
    save_trained,
    start_run,
    training_record,
)
from vlmprune.methods.atp import (
    ATP,
    ThresholdHeads,
    head_features,
    minmax,
    spatial_score,
)

GRID = (16, 16)
N = 256
#: the weights file written by default, beside the embedded model (assets/)
WEIGHTS = "atp_embedded.safetensors"


def layer_scores(probs: torch.Tensor, batch: Batch, alive: torch.Tensor | None = None):
    """``(S_self, S_cross)`` ``[B, 256]`` from attention probabilities ``[B, H, L, L]``: column
    means over the (alive) visual queries, and the last prompt token's row; head means."""
    vis = batch.visual
    rows, last = batch.query
    p = probs.mean(1)
    cross = p[rows, last][:, vis]
    block = p[:, vis, vis]  # [B, Nq, Nk]
    if alive is None:
        self_ = block.mean(1)
    else:
        w = alive.float()
        self_ = (block * w[:, :, None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
    return self_, cross


def soft_step(lm: FrozenLM, heads: ThresholdHeads, batch: Batch, schedule, ratio: float, self_weight: float):
    """One soft-masked forward: logits and the soft kept fraction after the last point."""
    b = batch.ids.shape[0]
    raster = torch.arange(N).expand(b, -1)
    layers = {k: t for t, (k, _, _) in enumerate(schedule)}
    state = {"m": torch.ones(b, N)}

    def at_layer(i, probs, hidden):
        if i not in layers:
            return None
        t = layers[i]
        s_self, s_cross = (x.detach() for x in layer_scores(probs, batch))
        red = self_weight * minmax(s_self) + (1 - self_weight) * minmax(s_cross)
        feats = head_features(s_self, s_cross, state["m"].mean(1).detach(), ratio)
        theta = heads(t, feats)
        m_r = torch.sigmoid((red - theta[:, :1]) * heads.tau)
        m_s = torch.sigmoid((spatial_score(raster, GRID[1], schedule[t][2]) - theta[:, 1:]) * heads.tau)
        state["m"] = state["m"] * torch.maximum(m_r, m_s)
        mask = torch.zeros(batch.ids.shape)
        mask[:, batch.visual] = torch.log(state["m"] + 1e-6)
        return mask

    logits, _ = lm.run(batch, at_layer=at_layer)
    return logits, state["m"].mean(1)


@torch.no_grad()
def hard_eval(lm: FrozenLM, batcher: Batcher, items, method: ATP | None, ratio: float, batch_size: int = 16):
    """Accuracy and per-point kept counts with the method's own ``select()`` (``None``: all tokens)."""
    info = ModelInfo("llava", N, GRID, True, 12, 10, lm.depth, ("llm",))
    correct, counts = 0, []
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        batch = batcher(chunk)
        b = len(chunk)
        if method is None:
            logits, _ = lm.run(batch)
            correct += int((logits.argmax(-1) == batch.answers).sum())
            continue
        points = [p.layer for p in method.points(info)]
        alive = torch.ones(b, N, dtype=torch.bool)
        image_state = [{} for _ in range(b)]
        per_row = [[] for _ in range(b)]

        def at_layer(i, probs, hidden):
            if i not in points:
                return None
            s_self, s_cross = layer_scores(probs, batch, alive)
            for r in range(b):
                idx = alive[r].nonzero().flatten()
                sig = {
                    "text_attention": lambda layer, query="last", r=r, idx=idx, **kw: (s_cross if query == "last" else s_self)[r : r + 1, idx],
                }
                target = max(1, round(ratio * N)) if ratio < 1 else N
                ctx = TokenContext(
                    tokens=torch.zeros(1, idx.numel(), 1), stage="llm", layer=i, budget=min(target, idx.numel()),
                    target=min(target, idx.numel()), grid=GRID, token_index=idx[None], signals=Signals(sig), info=info,
                    images=(0,), image_state=[image_state[r]],
                )
                sel = method.select(ctx)
                keep = sel.keep[0]
                new = torch.zeros(N, dtype=torch.bool)
                new[idx[keep]] = True
                alive[r] = new
                per_row[r].append(int(new.sum()))
            mask = torch.zeros(batch.ids.shape)
            vis = torch.zeros(batch.ids.shape, dtype=torch.bool)
            vis[:, batch.visual] = ~alive
            return mask.masked_fill(vis, float("-inf"))

        logits, _ = lm.run(batch, at_layer=at_layer)
        correct += int((logits.argmax(-1) == batch.answers).sum())
        counts += per_row
    acc = correct / max(len(items), 1)
    if method is None:
        return acc, None
    c = torch.tensor(counts, dtype=torch.float)  # [n, points]
    depth = lm.depth
    layer_avg = (points[0] * N + sum(c[:, t] * ((points[t + 1] if t + 1 < len(points) else depth) - points[t]) for t in range(len(points)))) / depth
    return acc, {"mean_per_point": [round(float(x), 1) for x in c.mean(0)], "final_min": int(c[:, -1].min()),
                 "final_max": int(c[:, -1].max()), "layer_average": round(float(layer_avg.mean()), 1)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmprune.tools.train_atp", description=__doc__.split("\n\n")[0])
    add_run_arguments(p, WEIGHTS)
    p.add_argument("--plain", type=int, default=200, help="easy-VQA train questions (default 200)")
    p.add_argument("--grid", type=int, default=200, help="easyvqa-grid train questions (default 200)")
    p.add_argument("--test-plain", type=int, default=48, help="held-out easy-VQA test questions")
    p.add_argument("--test-grid", type=int, default=48, help="held-out easyvqa-grid test questions")
    p.add_argument("--steps", type=int, default=500,
                   help="training steps (default 500: at 150 the heads did not yet follow the target ratio)")
    p.add_argument("--batch", type=int, default=8, help="questions per step (default 8)")
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--tau", type=float, default=20.0, help="soft-mask temperature tau (scores in [0, 1])")
    p.add_argument("--hidden", type=int, default=16, help="threshold-head hidden width")
    p.add_argument("--budget-weight", type=float, default=50.0, help="weight of the budget loss (default 50)")
    p.add_argument("--ratios", default="0.125,0.25,0.5", help="target keep ratios r drawn per step")
    p.add_argument("--eval-ratios", default="0.25,0.125", help="ratios of the held-out report")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    clock = Clock()
    rng = random.Random(args.seed)
    try:
        ratios = [float(x) for x in args.ratios.split(",")]
        eval_ratios = [float(x) for x in args.eval_ratios.split(",")]
    except ValueError:
        print("error: --ratios and --eval-ratios must be comma-separated numbers", file=sys.stderr)
        return 2
    if any(not 0 < r < 1 for r in ratios + eval_ratios):
        print("error: --ratios and --eval-ratios must lie in (0, 1)", file=sys.stderr)
        return 2
    run = start_run(args.cache_dir, args.threads, args.seed, args.model, args.out)
    if run is None:
        return 2
    model, processor, lm, features, batcher = run
    train = load_items(features, "train", args.plain, args.grid, args.seed)
    test = load_items(features, "test", args.test_plain, args.test_grid, args.seed + 1)
    batcher.check_against_processor(processor, train[0].question)
    info = ModelInfo("llava", N, GRID, True, 12, 10, lm.depth, ("llm",))
    tf = ATP()
    schedule = tf.schedule(info)
    log(f"[{clock():.0f}s] data: {len(train)} train / {len(test)} test questions; ATP points (layer, mass, stride) {schedule}")

    heads = ThresholdHeads([k for k, _, _ in schedule], hidden=args.hidden, tau=args.tau)
    heads.train()
    opt = torch.optim.AdamW(heads.parameters(), lr=args.lr, weight_decay=0.0)
    for step in range(args.steps):
        ratio = rng.choice(ratios)
        chunk = [train[rng.randrange(len(train))] for _ in range(args.batch)]
        batch = batcher(chunk)
        logits, frac = soft_step(lm, heads, batch, schedule, ratio, tf.self_weight)
        ce = torch.nn.functional.cross_entropy(logits, batch.answers)
        budget = (frac.mean() - ratio) ** 2
        loss = ce + args.budget_weight * budget
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            acc = float((logits.argmax(-1) == batch.answers).float().mean())
            log(f"[{clock():.0f}s] step {step:3d}  r {ratio:.3f}  CE {float(ce.detach()):.3f}  soft kept {float(frac.mean().detach()):.3f}  "
                f"budget loss {float(budget.detach()):.4f}  batch acc {acc:.2f}")
    heads.eval()

    report = {"all 256": {"accuracy": hard_eval(lm, batcher, test, None, 1.0)[0]}}
    learned = ATP()
    learned.load_weights(heads)
    for r in eval_ratios:
        for name, method in (("atp-tf", tf), ("atp-learned", learned)):
            acc, counts = hard_eval(lm, batcher, test, method, r)
            report[f"{name} r={r}"] = {"accuracy": acc, **counts}
    log(f"[{clock():.0f}s] held-out ({len(test)} questions), answer accuracy and kept visual tokens (of {N}):")
    for name, rec in report.items():
        log(f"    {name:22s} " + "  ".join(f"{k} {v}" for k, v in rec.items()))

    save_trained(heads, args.out, WEIGHTS, training_record(parser, argv, args, clock, schedule=schedule, heldout=report), clock)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
