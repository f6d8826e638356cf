"""What the tools share: for the calibration commands (``calibrate_vflowopt``,
``calibrate_adatoken3d``) the models and samples they calibrate on (``--model tiny|embedded``),
how they fail and the JSON file they write; for the benchmarks (``eval_vit``, ``eval_vim``) the
images/s of a model over batches."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def images_per_second(model, batches) -> float:
    """images/s of ``model`` (already warm) over ``batches`` of pixels, without gradients."""
    with torch.no_grad():
        t = time.perf_counter()
        for x in batches:
            model(x)
        return sum(len(x) for x in batches) / (time.perf_counter() - t)


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


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """``--model tiny|embedded`` (default embedded), read by :func:`model_and_batches`."""
    parser.add_argument("--model", choices=("tiny", "embedded"), default="embedded", help="model to calibrate (default: embedded)")


def model_and_batches(args: argparse.Namespace):
    """``(model, batches)`` of ``--model`` (``args.samples``, ``args.seed``, ``args.batch_size``).
    Raises FileNotFoundError when the embedded model is not built."""
    loader = tiny_model_and_batches if args.model == "tiny" else embedded_model_and_batches
    return loader(args.samples, args.seed, args.batch_size)


def fail(err: Exception) -> int:
    """``error: <err>`` on stderr; the command's exit status 2."""
    print(f"error: {err}", file=sys.stderr)
    return 2


def write_json(path, data: dict) -> Path:
    """Write ``data`` as indented JSON (a final newline) to ``path``, creating its folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return out
