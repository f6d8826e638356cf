"""AdaToken-3D's offline schedule: attention information flow, an exponential-decay fit, stages.

``python -m vlmprune.tools.calibrate_adatoken3d --model tiny|embedded --samples N --out schedule.json``
writes a schedule that ``vlmprune.wrap(model, "adatoken3d", budget=..., schedule="schedule.json")``
loads (the official ``llava/eval/ATE_inference.py``, arXiv 2505.12782):

1. **Attention maps**: each sample runs once with the language model on eager attention and
   ``output_attentions=True`` (calibration only; ``wrap()`` never does this); per LLM layer the
   head-mean map ``A [T, T]`` (row = query, column = key) of the sample's real tokens,
   average-pooled ``pool x pool`` (official 10; spans divided by ``pool``).
2. **Information per layer** (:func:`layer_information`), spans ``s`` (first image token),
   ``q`` (first token after the image), ``T``: ``intra`` (image <-> image) and ``inter``
   (``0.7`` x prefix <-> image + ``0.3`` x image <-> instruction), times 100.
   ``orientation="causal"`` (default) sums the key-earlier entries (query later than key), as
   the card's correction; ``"code"`` sums the official index ranges literally, which lie in the
   upper triangle a causal model masks (only pooled blocks straddling the diagonal contribute).
   Averaged over the samples (the official script uses its first sample).
3. **Contribution** (:func:`contribution`): ``M_1 = intra_1``, ``M_l = M_{l-1} + 0.73 intra_l``,
   ``c_l = 0.4 intra_l + 0.3 inter_l + 0.3 M_l`` for layers ``l = 2..L``, min-max normalised.
4. **Fit** (:func:`fit_retention`): ``f(x) = A exp(-B (x - C)) + D`` over layers ``x = 1..L``
   minimising ``sum (f - 100 c)^2 + sum (f' - 100 c')^2`` (``numpy.gradient`` differences) with
   ``f(1) = 100`` and ``f(L) = final`` (official ``a = 10``). The two constraints fix ``A`` and
   ``D`` given ``B`` (``C`` only rescales ``A``, set to 1), so this is a one-dimensional search
   over ``B`` (a log-spaced scan, then golden-section refinement) where the official script
   runs SLSQP on all four.
5. **Stages**: ``stages`` pruning points spread evenly over the LLM, before decoder layer
   ``K_t = floor(t L / (stages + 1) + 0.5)`` (8, 16, 24 of 32 for 3 stages, the built-in
   ``layer_list``), each keeping ``f(K_t + 1) / 100`` of the original tokens (the retention of
   the first layer after the point). The official code ships hand-discretised lists.

Deviations from the official script, and why: the sums use the causal orientation (the literal
one is ~0 on a causal model); the data points sit at their own layers ``x = 2..L`` (the script
fits them at ``x = 1..L-1`` while constraining ``f(32)``); the fit targets ``100 c`` (the script
fits the 0..1 values against constraints at 100 and ``a``); ``pool`` defaults to 1 (the
official 10 was a cost device for 1720-token maps and, on a short prompt, erases the one-token
prefix span); spans come from each prompt (the script hard-codes 37 / 1686 / 1720).

``--model tiny``: a seeded random-weight tiny LLaVA on random prompts (to test the command).
``--model embedded``: the embedded VLM (:func:`vlmprune.embedded.load_embedded`) on easy-VQA
training questions, once ``assets/embedded_vlm/config.json`` exists.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch

from vlmprune.method import scale_llm_layers
from vlmprune.tools._common import add_model_argument, fail, model_and_batches, write_json

#: the official analysis weights: ``q``/``k`` of the inter term, ``alpha/beta/gamma`` of the
#: contribution and the accumulation factor of ``M``
WEIGHTS = dict(inter_prefix=0.7, inter_instruction=0.3, alpha=0.4, beta=0.3, gamma=0.3, accumulate=0.73)


# ------------------------------------------------------------------------------------- analysis
def layer_information(attn: torch.Tensor, s: int, q: int, orientation: str = "causal", pool: int = 1) -> tuple[float, float]:
    """``(intra, inter)`` of one head-mean attention map ``attn [T, T]`` (row = query, column =
    key) whose image tokens are ``s..q-1`` (see the module docstring, step 2)."""
    if orientation not in ("causal", "code"):
        raise ValueError(f"orientation must be 'causal' or 'code', got {orientation!r}")
    a = attn.double()
    if pool > 1:
        a = torch.nn.functional.avg_pool2d(a[None, None], pool, stride=pool)[0, 0]
        s, q = s // pool, q // pool
    t = a.shape[0]
    idx = torch.arange(t)
    x, y = idx[:, None], idx[None, :]  # query row, key column
    image = lambda i: (i >= s) & (i < q)  # noqa: E731
    w = WEIGHTS
    if orientation == "code":  # the official index ranges, literally
        intra = image(x) & image(y) & (x < y)
        prefix = (x < s) & image(y)
        instruction = (x > s) & (x < q) & (y >= q)
    else:  # the same pairs with the earlier token as the key
        intra = image(x) & image(y) & (y < x)
        prefix = image(x) & (y < s)
        instruction = (x >= q) & image(y)
    inter = w["inter_prefix"] * a[prefix].sum() + w["inter_instruction"] * a[instruction].sum()
    return float(100 * a[intra].sum()), float(100 * inter)


def contribution(intra, inter) -> np.ndarray:
    """Min-max normalised contribution of layers ``2..L`` from per-layer ``intra``/``inter``
    (step 3); all zeros when it is constant."""
    w = WEIGHTS
    m = intra[0]
    out = []
    for i in range(1, len(intra)):
        m = m + w["accumulate"] * intra[i]
        out.append(w["alpha"] * intra[i] + w["beta"] * inter[i] + w["gamma"] * m)
    c = np.asarray(out, dtype=np.float64)
    span = c.max() - c.min()
    return (c - c.min()) / span if span > 0 else np.zeros_like(c)


def retention_curve(b: float, final: float, depth: int, x: np.ndarray) -> np.ndarray:
    """``f(x)`` with ``f(1) = 100``, ``f(depth) = final`` and decay rate ``b`` (linear at b = 0)."""
    if abs(b) < 1e-9:
        g = (x - 1) / (depth - 1)
    else:
        g = np.expm1(-b * (x - 1)) / np.expm1(-b * (depth - 1))
    return 100 - (100 - final) * g


def fit_retention(curve, final: float, depth: int) -> dict:
    """Fit ``f(x) = A exp(-B (x - C)) + D`` to ``curve`` (percent values at layers ``x = 2..depth``)
    with ``f(1) = 100`` and ``f(depth) = final`` (step 4). Returns ``A, B, C, D``, the objective
    and ``f`` at ``x = 1..depth``."""
    if not 0 < final < 100:
        raise ValueError(f"final retention must be in (0, 100) percent, got {final}")
    y = np.asarray(curve, dtype=np.float64)
    if y.shape != (depth - 1,):
        raise ValueError(f"curve must hold {depth - 1} values (layers 2..{depth}), got {y.shape}")
    x = np.arange(2, depth + 1, dtype=np.float64)
    dy = np.gradient(y) if y.size > 1 else np.zeros_like(y)

    def objective(b: float) -> float:
        f = retention_curve(b, final, depth, x)
        df = np.gradient(f) if f.size > 1 else np.zeros_like(f)
        return float(((f - y) ** 2).sum() + ((df - dy) ** 2).sum())

    grid = np.concatenate([-np.logspace(1, -4, 60), [0.0], np.logspace(-4, 1, 60)])
    values = [objective(b) for b in grid]
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(100):  # golden-section search inside the bracket
        c1, c2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if objective(c1) < objective(c2):
            hi = c2
        else:
            lo = c1
    b = (lo + hi) / 2
    if objective(grid[i]) < objective(b):
        b = float(grid[i])
    if abs(b) < 1e-9:  # the linear limit has no exponential form; report the nearest one
        b = 1e-9
    a_coef = (100 - final) / -np.expm1(-b * (depth - 1))
    return {
        "A": float(a_coef), "B": float(b), "C": 1.0, "D": float(100 - a_coef),
        "objective": objective(b),
        "retention": retention_curve(b, final, depth, np.arange(1, depth + 1, dtype=np.float64)).tolist(),
    }


def stage_layers(depth: int, stages: int) -> list[int]:
    """Pruning points spread evenly over a ``depth``-layer LLM (step 5): ``t`` of ``stages + 1``
    scaled by :func:`~vlmprune.method.scale_llm_layers` (collisions spread apart)."""
    if not 1 <= stages <= depth - 1:
        raise ValueError(f"stages must be in [1, {depth - 1}] for a {depth}-layer LLM, got {stages}")
    return list(scale_llm_layers(range(1, stages + 1), stages + 1, depth, "--stages", spread=True))


# ------------------------------------------------------------------------------------- the model
def _language_config(model):
    return getattr(model.config, "text_config", model.config)


@torch.no_grad()
def measure(model, batches: list[dict], orientation: str = "causal", pool: int = 1) -> tuple[list[float], list[float], int]:
    """Per-layer ``intra``/``inter`` averaged over every sample of ``batches``, and the sample
    count. The model runs on eager attention for these forwards only (then as before)."""
    image_id = model.config.image_token_id
    previous = {"": model.config._attn_implementation}
    previous.update({key: getattr(model.config, key)._attn_implementation for key in getattr(model.config, "sub_configs", {})})
    model.set_attn_implementation("eager")
    try:
        depth = _language_config(model).num_hidden_layers
        intra, inter, n = np.zeros(depth), np.zeros(depth), 0
        for inputs in batches:
            mask = inputs["attention_mask"]
            pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            out = model(**inputs, position_ids=pos, output_attentions=True, use_cache=False)
            if not out.attentions or out.attentions[0] is None:
                raise RuntimeError("the model returned no attention maps with output_attentions=True on eager attention")
            for row in range(mask.shape[0]):
                real = mask[row].bool()
                ids = inputs["input_ids"][row][real]
                image = (ids == image_id).nonzero().flatten()
                if image.numel() == 0:
                    raise ValueError(f"calibration sample {n} has no image token (id {image_id})")
                s, q = int(image[0]), int(image[-1]) + 1
                for layer, attn in enumerate(out.attentions):
                    a = attn[row][:, real][:, :, real].float().mean(0)
                    i, e = layer_information(a, s, q, orientation, pool)
                    intra[layer] += i
                    inter[layer] += e
                n += 1
    finally:
        model.set_attn_implementation(previous)
    return (intra / n).tolist(), (inter / n).tolist(), n


def calibrate(model, batches: list[dict], final: float = 10.0, stages: int = 3, orientation: str = "causal", pool: int = 1) -> dict:
    """The schedule (``{"method", "layers", "ratios", "llm_layers", "calibration"}``)."""
    depth = _language_config(model).num_hidden_layers
    layers = stage_layers(depth, stages)
    intra, inter, n = measure(model, batches, orientation, pool)
    c = contribution(intra, inter)
    fit = fit_retention(100 * c, final, depth)
    retention = fit["retention"]
    ratios = [round(min(1.0, max(1e-4, retention[k] / 100)), 6) for k in layers]  # f(K + 1): index K of x = 1..L
    return {
        "method": "adatoken3d",
        "layers": layers,
        "ratios": ratios,
        "llm_layers": depth,
        "calibration": {
            "samples": n,
            "final_percent": final,
            "stages": stages,
            "orientation": orientation,
            "pool": pool,
            "weights": WEIGHTS,
            "intra": intra,
            "inter": inter,
            "contribution": c.tolist(),
            "fit": {k: fit[k] for k in ("A", "B", "C", "D", "objective")},
            "retention": retention,
        },
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmprune.tools.calibrate_adatoken3d", description=__doc__.split("\n\n")[0])
    add_model_argument(p)
    p.add_argument("--samples", type=int, default=8, help="calibration samples (default 8)")
    p.add_argument("--final", type=float, default=10.0, help="retention at the last LLM layer, percent (official a = 10)")
    p.add_argument("--stages", type=int, default=3, help="pruning points (default 3, as the built-in layer_list)")
    p.add_argument("--orientation", choices=("causal", "code"), default="causal", help="information sums (see the module docstring)")
    p.add_argument("--pool", type=int, default=1, help="average-pooling window of the maps (official 10)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="seed of the samples (and the tiny model)")
    p.add_argument("--out", required=True, help="path of the JSON schedule to write")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.samples < 1 or args.pool < 1:
        print("error: --samples and --pool must be >= 1", file=sys.stderr)
        return 2
    try:
        model, batches = model_and_batches(args)
        schedule = calibrate(model, batches, args.final, args.stages, args.orientation, args.pool)
    except (FileNotFoundError, ValueError) as err:
        return fail(err)
    schedule["calibration"].update(model=args.model, seed=args.seed)
    out = write_json(args.out, schedule)
    print(f"layers {schedule['layers']} ratios {schedule['ratios']} (B = {schedule['calibration']['fit']['B']:.4g}); wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
