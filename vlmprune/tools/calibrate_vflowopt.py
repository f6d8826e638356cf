"""VFlowOpt's flow-guided hyper-parameter search, as a seeded calibration command.

``python -m vlmprune.tools.calibrate_vflowopt --model tiny|embedded --budget 0.25 --trials 20 --out cfg.json``
writes a config that ``vlmprune.wrap(model, "vflowopt", budget=0.25, config="cfg.json")`` loads.

The objective is the paper's "visual information flow": the mean cosine similarity, over a few
calibration samples, between the final-layer hidden state of the last prompt token at prefill
with and without pruning. The searched variables and bounds are the official script's
(``llava_ov_opt_all.py``, 25 % budget), written relative to the budget fraction ``rho``:
``r_v in [rho, 1.5 rho]``, ``r_1 in [0.2/0.375, 1]``, ``t in [0, 50]``, ``m in [3, 24]``
(tokens of a 27-wide grid; the method scales it), ``alpha_v in [-1, 1]``; ``r_2`` follows from
the budget (:func:`vlmprune.methods.vflowopt.solve_ratios`).

Search: the official code runs scikit-optimize's Gaussian-process minimiser with 27 random
initial points and 300 calls. With the few trials this command is meant for (fewer than 27)
that minimiser evaluates only its random initial points, so this is a seeded uniform random
search over the same box (no new dependency), with one change: trial 0 is the default
configuration (the released config nearest the budget), so the result is never worse than
the default on the calibration samples.

``--model tiny``: a seeded random-weight tiny LLaVA on random images and prompts, for testing
the command. ``--model embedded``: the embedded VLM
(:func:`vlmprune.embedded.load_embedded`) on easy-VQA training questions (the paper uses 30
random training samples), available once ``assets/embedded_vlm/config.json`` exists.
"""

from __future__ import annotations

import argparse
import math
import random

import torch

import vlmprune
from vlmprune.methods.vflowopt import SEARCHED, VFlowOpt
from vlmprune.tools._common import add_model_argument, fail, model_and_batches, write_json


def search_space(rho: float) -> dict[str, tuple[float, float]]:
    """Bounds of the searched hyper-parameters for an average keep fraction ``rho``."""
    return {
        "r_v": (rho, min(1.0, 1.5 * rho)),
        "r_1": (0.2 / 0.375, 1.0),
        "t": (0.0, 50.0),
        "m": (3.0, 24.0),
        "alpha_v": (-1.0, 1.0),
    }


def _final_norm(model):
    core = getattr(model, "model", model)
    lm = getattr(core, "language_model", core)
    if not hasattr(lm, "norm"):
        raise ValueError(f"cannot find the final norm of {type(model).__name__}'s language model")
    return lm.norm


@torch.no_grad()
def last_hidden(model, batches: list[dict]) -> torch.Tensor:
    """Final-layer hidden state of every prompt's last token at prefill, ``[samples, D]``."""
    seen = []
    hook = _final_norm(model).register_forward_hook(lambda m, a, out: seen.append(out[:, -1].float()))
    try:
        for inputs in batches:
            mask = inputs["attention_mask"]
            pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            model(**inputs, position_ids=pos, use_cache=False)
    finally:
        hook.remove()
    return torch.cat(seen)


def flow_objective(model, batches: list[dict], reference: torch.Tensor, budget, options: dict) -> float:
    """Mean cosine similarity of pruned to unpruned last hidden states (the paper's objective)."""
    with vlmprune.wrap(model, "vflowopt", budget=budget, **options):
        pruned = last_hidden(model, batches)
    return float(torch.nn.functional.cosine_similarity(pruned, reference, dim=-1).mean())


def keep_fraction(model, batches: list[dict], budget) -> float:
    """The budget as a fraction of the visual tokens per image (from the images' size)."""
    patch = model.config.vision_config.patch_size
    height, width = batches[0]["pixel_values"].shape[-2:]
    n = (height // patch) * (width // patch)
    return vlmprune.Budget.parse(budget).resolve_target(n) / n


def default_options(model, rho: float) -> dict:
    """The searched hyper-parameters as the method resolves them by default at fraction ``rho``."""
    from vlmprune.adapters import find_adapter

    hp = VFlowOpt().hyper(rho, find_adapter(model).info())
    return {"r_v": hp["r_v"], "r_1": hp["r_1"], "t": hp["t"], "m": hp["m"], "alpha_v": 0.0}


def calibrate(model, batches: list[dict], budget, trials: int, seed: int = 0, log=print) -> dict:
    """Run the search; returns the config (``{"method", "options", "calibration"}``)."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    rho = keep_fraction(model, batches, budget)
    space = search_space(rho)
    rng = random.Random(seed)
    reference = last_hidden(model, batches)
    history = []
    for trial in range(trials):
        if trial == 0:
            options = default_options(model, rho)
        else:
            options = {key: rng.uniform(*space[key]) for key in SEARCHED}
        score = flow_objective(model, batches, reference, budget, options)
        history.append({"options": options, "objective": score})
        log(f"trial {trial}: objective {score:.6f} " + " ".join(f"{k}={v:.4g}" for k, v in options.items()))
    best = max(history, key=lambda h: h["objective"])
    return {
        "method": "vflowopt",
        "options": best["options"],
        "calibration": {
            "budget": budget,
            "budget_fraction": rho,
            "objective": best["objective"],
            "objective_default": history[0]["objective"],
            "trials": trials,
            "samples": int(reference.shape[0]),
            "seed": seed,
            "search": "seeded uniform random search; trial 0 = default (released) config",
            "space": space,
            "history": history,
        },
    }


def _budget(text: str):
    value = float(text)
    if value >= 1 and value == math.floor(value) and "." not in text:
        return int(value)
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmprune.tools.calibrate_vflowopt", description=__doc__.split("\n\n")[0])
    add_model_argument(p)
    p.add_argument("--budget", type=_budget, default=0.25, help="average keep fraction (float) or tokens (int); default 0.25")
    p.add_argument("--trials", type=int, default=20, help="configurations evaluated, the default one first (default 20)")
    p.add_argument("--samples", type=int, default=30, help="calibration samples (the paper: 30)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and the search")
    p.add_argument("--out", required=True, help="path of the JSON config to write")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, batches = model_and_batches(args)
        config = calibrate(model, batches, args.budget, args.trials, args.seed)
    except (FileNotFoundError, ValueError) as err:
        return fail(err)
    config["calibration"]["model"] = args.model
    out = write_json(args.out, config)
    cal = config["calibration"]
    print(f"best objective {cal['objective']:.6f} (default {cal['objective_default']:.6f}); wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
