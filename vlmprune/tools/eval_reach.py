"""``vlmprune eval --task easyvqa-reach`` (= ``python -m vlmprune.tools.eval_reach``): the embedded
reach policy (``assets/embedded_vla``, a :class:`vlmprune.vla.VLAPolicy`) in closed loop on
``easyvqa-reach`` (:mod:`vlmprune.embedded.reach`) with its visual tokens pruned.

For each row of :data:`RUNS` (VLA-Pruner with and without its temporal term, FastV, DivPrune,
uniform, random) and keep budget (:data:`BUDGETS`: 50 %, 25 %, 12.5 % of the 256 visual tokens),
the seeded test episodes run one at a time (``handle.reset()`` before each: one episode, one
session), and the row gets the success rate, the mean steps, the visual tokens the LLM kept
(after the method's last pruning point, and the mean over the LLM's layers; means over control
steps, from ``handle.stats``), and the median per-step
LLM prefill time (the language model's first forward of each control step, pruning included),
with its ratio to the unwrapped policy's, measured in the same run (method ``none``, first).

The vision tower's output is memoised per frame (same pixels, same tensor: the pruning acts
inside the LLM, after it), so the frames that several runs share are encoded once; results are
unchanged and the timed prefill never includes it. Writes ``results.json``, ``results.csv``,
``table.md`` and ``success_vs_keep.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch

import vlmprune
from vlmprune.embedded import reach
from vlmprune.eval.runner import visual_token_counts

#: (row name, method, options)
RUNS = (
    ("vla_pruner", "vla_pruner", {}),
    ("vla_pruner (no temporal)", "vla_pruner", {"use_temporal": False}),
    ("fastv", "fastv", {}),
    ("divprune", "divprune", {}),
    ("uniform", "uniform", {}),
    ("random", "random", {}),
)
BUDGETS = (0.5, 0.25, 0.125)
OUT = Path(__file__).resolve().parents[2] / "assets" / "benchmark_vla"
POLICY = Path(__file__).resolve().parents[2] / "assets" / "embedded_vla"
FIELDS = ("method", "budget", "tokens_final", "tokens_kept", "episodes", "success_rate", "mean_steps", "prefill_ms",
          "prefill_ratio", "steps_timed")


def load_policy(path=None):
    """``(policy, processor)``: the reach policy directory (default ``assets/embedded_vla``, or any
    embedded-style or self-contained LLaVA directory whose last :data:`reach.N_BINS` ids are the
    action bins) as a :class:`~vlmprune.vla.VLAPolicy` with ``action_dim=2`` and the bins' values
    :data:`reach.ACTION_VALUES`."""
    from vlmprune.embedded import load_embedded
    from vlmprune.vla import VLAPolicy

    llava, processor = load_embedded(path or POLICY)
    return VLAPolicy(llava, action_dim=reach.ACTION_DIM, bins=reach.N_BINS, values=reach.ACTION_VALUES).eval(), processor


def actor(policy, processor):
    """``act(frame, instruction) -> (dx, dy)``: one control step of ``policy``."""

    def act(frame, text):
        inputs = processor(images=[frame], text=[reach.prompt(text)], return_tensors="pt")
        return tuple(round(float(v)) for v in policy.predict_action(**inputs)[0])

    return act


class VisionMemo:
    """While active, the vision tower returns the output it gave before for the same
    ``pixel_values`` (only the hidden state LLaVA reads is kept; reading another raises)."""

    def __init__(self, llava):
        self.tower = llava.model.vision_tower
        self.layer = llava.config.vision_feature_layer
        self.cache: dict = {}

    def __enter__(self):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        original = self.tower.forward

        def forward(pixel_values, *args, **kwargs):
            key = hashlib.sha1(pixel_values.detach().float().cpu().numpy().tobytes()).hexdigest()
            hit = self.cache.get(key)
            if hit is None:
                out = original(pixel_values, *args, **kwargs)
                n = len(out.hidden_states)
                hit = self.cache[key] = (n, out.hidden_states[self.layer])
            n, h = hit
            states = [None] * n
            states[self.layer] = h
            return BaseModelOutputWithPooling(hidden_states=tuple(states))

        self.tower.forward = forward
        return self

    def __exit__(self, *exc):
        del self.tower.forward


class PrefillTimer:
    """Times every forward of the language model that reads more than one position (a prefill)."""

    def __init__(self, llava):
        self.lm = llava.model.language_model
        self.times: list[float] = []
        self._t0 = None

    def __enter__(self):
        def pre(_module, args, kwargs):
            x = kwargs.get("inputs_embeds")
            if x is None:
                x = kwargs.get("input_ids", args[0] if args else None)
            self._t0 = time.perf_counter() if x is not None and x.shape[1] > 1 else None

        def post(_module, _args, _kwargs, _out):
            if self._t0 is not None:
                self.times.append(time.perf_counter() - self._t0)
                self._t0 = None

        self._hooks = [self.lm.register_forward_pre_hook(pre, with_kwargs=True),
                       self.lm.register_forward_hook(post, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()


def run_episodes(policy, processor, specs, handle=None, on_step=None) -> tuple[list, list[float], list[float]]:
    """The episodes one by one (``handle.reset()`` before each when wrapped): traces, per-step
    prefill seconds and, wrapped, per-step visual tokens ``(after the last pruning point, mean
    over the LLM's layers)`` (:func:`vlmprune.eval.runner.visual_token_counts`)."""
    act = actor(policy, processor)
    n_layers = policy.llava.config.text_config.num_hidden_layers
    traces, kept = [], []
    with PrefillTimer(policy.llava) as timer:
        for spec in specs:
            if handle is not None:
                handle.reset()

            def step(i, frame, action, spec=spec):
                if handle is not None:
                    counts = visual_token_counts(handle.stats, n_layers)
                    kept.append((counts["final"][0], counts["kept"][0]) if counts else (256.0, 256.0))
                if on_step is not None:
                    on_step(spec, i, frame, action)

            traces.append(reach.run_episode(spec, act, on_step=step))
    return traces, timer.times, kept


def _row(name, budget, traces, times, kept, base_ms) -> dict:
    ms = statistics.median(times) * 1e3 if times else float("nan")
    final = statistics.mean(k[0] for k in kept) if kept else 256.0
    layers = statistics.mean(k[1] for k in kept) if kept else 256.0
    return {"method": name, "budget": budget, "tokens_final": round(final, 1), "tokens_kept": round(layers, 1),
            "episodes": len(traces), "success_rate": round(sum(t.success for t in traces) / max(len(traces), 1), 4),
            "mean_steps": round(sum(len(t.actions) for t in traces) / max(len(traces), 1), 3),
            "prefill_ms": round(ms, 3), "prefill_ratio": round(ms / base_ms, 3) if base_ms else 1.0,
            "steps_timed": len(times)}


def run_benchmark(policy, processor, specs, runs=RUNS, budgets=BUDGETS, log=print) -> list[dict]:
    """Rows: ``none`` (unwrapped) first, then every run at every budget, on the same episodes."""
    rows = []
    with VisionMemo(policy.llava):
        actor(policy, processor)(reach.render(specs[0].scene, specs[0].start), specs[0].instruction)  # warm-up
        traces, times, _ = run_episodes(policy, processor, specs)
        base = _row("none", 1.0, traces, times, [], None)
        rows.append(base)
        log(_fmt(base))
        for name, method, options in runs:
            for b in budgets:
                with vlmprune.wrap(policy, method, budget=b, **options) as handle:
                    traces, times, kept = run_episodes(policy, processor, specs, handle)
                rows.append(_row(name, b, traces, times, kept, base["prefill_ms"]))
                log(_fmt(rows[-1]))
    return rows


def _fmt(r: dict) -> str:
    return (f"{r['method']:26s} keep {r['budget']:.3f} ({r['tokens_final']:5.1f} tokens, {r['tokens_kept']:5.1f} "
            f"layer mean): success "
            f"{100 * r['success_rate']:5.1f} % in {r['mean_steps']:.2f} steps, prefill {r['prefill_ms']:.2f} ms "
            f"(x{r['prefill_ratio']:.2f})")


def table(rows: list[dict]) -> str:
    """Markdown: success rate (%) and prefill-time ratio per method, one column per budget."""
    budgets = sorted({r["budget"] for r in rows if r["method"] != "none"}, reverse=True)
    base = next(r for r in rows if r["method"] == "none")
    head = "| method | " + " | ".join(f"keep {100 * b:g} %" for b in budgets) + " |"
    lines = [head, "|---" * (len(budgets) + 1) + "|",
             f"| none (all 256) | {100 * base['success_rate']:.0f} % ({base['prefill_ms']:.1f} ms)"
             + " |" * len(budgets)]
    for name in dict.fromkeys(r["method"] for r in rows if r["method"] != "none"):
        cells = []
        for b in budgets:
            r = next((r for r in rows if r["method"] == name and r["budget"] == b), None)
            cells.append("-" if r is None else f"{100 * r['success_rate']:.0f} % (x{r['prefill_ratio']:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    base = next(r for r in rows if r["method"] == "none")
    for name in dict.fromkeys(r["method"] for r in rows if r["method"] != "none"):
        rs = sorted((r for r in rows if r["method"] == name), key=lambda r: r["budget"])
        x = [100 * r["budget"] for r in rs]
        ax.plot(x, [100 * r["success_rate"] for r in rs], marker="o", label=name)
        bx.plot(x, [r["prefill_ratio"] for r in rs], marker="o", label=name)
    ax.axhline(100 * base["success_rate"], color="k", ls="--", lw=1, label="none (all tokens)")
    bx.axhline(1.0, color="k", ls="--", lw=1)
    for a, y in ((ax, "success rate (%)"), (bx, "LLM prefill time / unwrapped")):
        a.set_xlabel("visual tokens kept (%)")
        a.set_ylabel(y)
        a.set_xscale("log", base=2)
        a.set_xticks([12.5, 25, 50])
        a.set_xticklabels(["12.5", "25", "50"])
    ax.set_title(f"easyvqa-reach, {base['episodes']} test episodes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmprune eval --task easyvqa-reach", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default=reach.TASK, choices=(reach.TASK,))
    p.add_argument("--model", default=None, help="policy directory (default: assets/embedded_vla)")
    p.add_argument("--episodes", type=int, default=reach.DEFAULT_TEST["n"])
    p.add_argument("--seed", type=int, default=reach.DEFAULT_TEST["seed"])
    p.add_argument("--methods", type=_csv, default=None,
                   help=f"comma-separated rows of {[r[0] for r in RUNS]} (default: all)")
    p.add_argument("--budgets", type=_csv, default=[str(b) for b in BUDGETS], help="fractions kept")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    return p


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    names = [r[0] for r in RUNS]
    runs = RUNS if args.methods is None else tuple(r for r in RUNS if r[0] in args.methods)
    unknown = sorted(set(args.methods or ()) - set(names))
    if unknown:
        raise SystemExit(f"vlmprune eval --task {reach.TASK}: --methods: unknown {unknown}; choose from {names}")
    try:
        budgets = [float(b) for b in args.budgets]
    except ValueError:
        raise SystemExit(f"vlmprune eval --task {reach.TASK}: --budgets takes fractions kept, got {args.budgets}")
    if not budgets or any(not 0 < b <= 1 for b in budgets) or args.episodes < 1:
        raise SystemExit(f"vlmprune eval --task {reach.TASK}: --budgets must be fractions in (0, 1] and --episodes >= 1")
    torch.set_num_threads(args.threads)
    policy, processor = load_policy(args.model)
    specs = reach.episodes("test", args.episodes, args.seed)
    t0 = time.time()
    rows = run_benchmark(policy, processor, specs, runs, budgets)
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers

    meta = {"task": reach.TASK, "episodes": args.episodes, "seed": args.seed, "threads": args.threads,
            "minutes": round((time.time() - t0) / 60, 1), "torch": torch.__version__,
            "transformers": transformers.__version__, "policy": str(args.model or "assets/embedded_vla")}
    (args.out / "results.json").write_text(json.dumps({"config": meta, "rows": rows}, indent=2) + "\n")
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    (args.out / "table.md").write_text(table(rows))
    plot(rows, args.out / "success_vs_keep.png")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
