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
import json
import math
import random
from pathlib import Path

import torch

import vlmprune
from vlmprune.methods.vflowopt import SEARCHED, VFlowOpt


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


# ----------------------------------------------------------------------------------- models and data
def tiny_model_and_batches(samples: int, seed: int, batch_size: int):
    """A seeded random-weight tiny LLaVA (CLIP tower 64 px / patch 4 -> 16 x 16 patches, 4 layers,
    feature layer 2; a 4-layer Llama of width 64) and random prompts with random images."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=4)
    text = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=3)).eval()
    n_img, gen = 256, torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, samples, batch_size):
        b = min(batch_size, samples - start)
        text_ids = torch.randint(4, 96, (b, 8), generator=gen)
        ids = torch.cat([torch.ones(b, 1, dtype=torch.long), torch.full((b, n_img), 3), text_ids], 1)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(b, 3, 64, 64, generator=gen)})
    return model, batches


def embedded_model_and_batches(samples: int, seed: int, batch_size: int):
    """The embedded VLM on ``samples`` seeded easy-VQA training questions."""
    from vlmprune.embedded import build_prompt, embedded_path, load_embedded
    from vlmprune.eval.easyvqa import load_task

    if not (embedded_path() / "config.json").exists():
        raise FileNotFoundError(
            f"--model embedded: the embedded VLM is not built yet ({embedded_path() / 'config.json'} is missing); "
            "use --model tiny"
        )
    model, processor = load_embedded()
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    data = load_task("easyvqa", split="train", n=samples, seed=seed)
    batches = []
    for start in range(0, samples, batch_size):
        chunk = data[start : start + batch_size]
        inputs = processor(
            images=[s.image for s in chunk], text=[build_prompt(s.question) for s in chunk], return_tensors="pt", padding=True
        )
        batches.append({k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    return model, batches


def _budget(text: str):
    value = float(text)
    if value >= 1 and value == math.floor(value) and "." not in text:
        return int(value)
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmprune.tools.calibrate_vflowopt", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "embedded"), default="embedded", help="model to calibrate (default: embedded)")
    p.add_argument("--budget", type=_budget, default=0.25, help="average keep fraction (float) or tokens (int); default 0.25")
    p.add_argument("--trials", type=int, default=20, help="configurations evaluated, the default one first (default 20)")
    p.add_argument("--samples", type=int, default=30, help="calibration samples (the paper: 30)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and the search")
    p.add_argument("--out", required=True, help="path of the JSON config to write")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    loader = tiny_model_and_batches if args.model == "tiny" else embedded_model_and_batches
    model, batches = loader(args.samples, args.seed, args.batch_size)
    config = calibrate(model, batches, args.budget, args.trials, args.seed)
    config["calibration"]["model"] = args.model
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(config, indent=2) + "\n")
    cal = config["calibration"]
    print(f"best objective {cal['objective']:.6f} (default {cal['objective_default']:.6f}); wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
