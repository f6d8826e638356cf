"""``vlmprune bench``: prefill time of a wrapped vs unwrapped LLaVA, measured in one run.

Sizes: ``tiny`` (CPU, seconds: a 4-layer LLM, 576 visual tokens) and ``llava-7b``
(LLaVA-1.5-7B's shapes with random weights: CLIP ViT-L/14-336, 576 visual tokens, a
32-layer Vicuna-7B; meant for a GPU in bf16). Prints, per method and keep fraction, the
median prefill seconds, the ratio to the unwrapped model (measured right before it, so
background load affects both alike), the share of the wrapped time
spent in ``select`` (scoring), and the KV-cache bytes after prefill.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vlmprune

KEEP = (1.0, 0.333, 0.111)


def build(size: str, device: str, dtype: torch.dtype, llm_layers: int | None = None, vision_layers: int | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if size == "tiny":
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=336, patch_size=14)
        text = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)
    elif size == "llava-7b":  # llava-hf/llava-1.5-7b-hf's shapes
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    else:
        raise ValueError(f"size must be one of 'tiny', 'llava-7b', got {size!r}")
    if llm_layers:
        text.num_hidden_layers = llm_layers
    if vision_layers:
        vision.num_hidden_layers = vision_layers
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000 if size != "tiny" else 3)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation("sdpa")
    return model.eval()


def inputs_for(model, batch: int, prompt_len: int = 40, device: str = "cpu") -> dict:
    cfg = model.config
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(4, min(cfg.text_config.vocab_size, 30000), (batch, prompt_len), generator=gen)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, n_img), cfg.image_token_id), text], 1)
    side = cfg.vision_config.image_size
    pixels = torch.randn(batch, 3, side, side, generator=gen)
    dtype = next(model.parameters()).dtype
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device, dtype),
    }


def _prefill_seconds(model, inputs, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        if inputs["input_ids"].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)
        if inputs["input_ids"].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def run(size="tiny", methods=("visionzip", "divprune", "fastv"), batches=(1,), device="cpu", dtype="float32", repeats=5, llm_layers=None, vision_layers=None):
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = build(size, device, torch_dtype, llm_layers, vision_layers)
    n_img = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    rows = []
    print(f"size={size} device={device} dtype={dtype} visual tokens/image={n_img} repeats={repeats}")
    print(f"{'batch':>5} {'method':>14} {'keep':>6} {'tokens':>6} {'base_s':>8} {'prefill_s':>10} {'ratio':>6} {'scoring':>8} {'kv_MiB':>8} {'kv_ratio':>8}")
    for batch in batches:
        inputs = inputs_for(model, batch, device=device)
        _prefill_seconds(model, inputs, 1)  # warm-up
        for name in methods:
            for keep in KEEP:
                budget = max(1, round(keep * n_img))
                base = _prefill_seconds(model, inputs, repeats)  # measured next to each wrapped run
                with vlmprune.wrap(model, name, budget=budget) as handle:
                    handle._stats.select_seconds = 0.0
                    seconds = _prefill_seconds(model, inputs, repeats)
                    stats = handle.stats
                scoring = stats["select_seconds"] / (repeats + 1) / seconds
                kv = stats["kv_cache_bytes"] / 2**20
                kv_ratio = stats["kv_cache_bytes"] / stats["kv_cache_bytes_unpruned"]
                row = dict(batch=batch, method=name, keep=keep, tokens=budget, seconds=seconds, ratio=seconds / base, scoring=scoring, kv_mib=kv, kv_ratio=kv_ratio)
                rows.append(row)
                print(f"{batch:>5} {name:>14} {keep:>6.3f} {budget:>6} {base:>8.4f} {seconds:>10.4f} {seconds / base:>6.2f} {scoring:>8.1%} {kv:>8.1f} {kv_ratio:>8.3f}")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="vlmprune bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=("tiny", "llava-7b"))
    parser.add_argument("--methods", default="visionzip,divprune,fastv")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--llm-layers", type=int, default=None, help="override the LLM depth (smoke tests)")
    parser.add_argument("--vision-layers", type=int, default=None, help="override the vision depth (smoke tests)")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    run(
        size=args.size,
        methods=[m for m in args.methods.split(",") if m],
        batches=[int(b) for b in args.batch.split(",")],
        device=args.device,
        dtype=dtype,
        repeats=args.repeats,
        llm_layers=args.llm_layers,
        vision_layers=args.vision_layers,
    )
