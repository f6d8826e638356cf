"""``vlmprune bench``: prefill time of a wrapped vs unwrapped VLM, measured in one run.

Sizes: ``tiny`` (CPU, seconds: a LLaVA with a 4-layer LLM, 576 visual tokens), ``llava-7b``
(LLaVA-1.5-7B's shapes with random weights: CLIP ViT-L/14-336, 576 visual tokens, a
32-layer Vicuna-7B; meant for a GPU in bf16), ``qwen2-vl-tiny`` (CPU: a Qwen2-VL with a
4-block vision encoder and a 4-layer LLM, one 672 x 672 image = 2304 patches = 576 merged
tokens) and ``qwen2-vl-7b`` (Qwen2-VL-7B's shapes: a 32-block 1280-wide vision encoder, a
28-layer 3584-wide LLM with 4 KV heads, the same image; GPU, bf16). Prints, per method and keep fraction, the
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


SIZES = ("tiny", "llava-7b", "qwen2-vl-tiny", "qwen2-vl-7b")
QWEN_SIDE = 672  # pixels: 48 x 48 patches of 14, 24 x 24 = 576 merged tokens
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def _instantiate(cls, config, device: str, dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation("sdpa")
    return model.eval()


def build_qwen(size: str, device: str, dtype: torch.dtype, llm_layers: int | None = None, vision_layers: int | None = None):
    """A Qwen2-VL with random weights: ``qwen2-vl-7b`` has Qwen/Qwen2-VL-7B-Instruct's shapes."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    common = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if size == "qwen2-vl-tiny":
        vision = dict(depth=4, embed_dim=64, hidden_size=256, num_heads=4, mlp_ratio=4, **common)
        text = dict(vocab_size=152064, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6})
    else:
        vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, **common)
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
    if llm_layers:
        text["num_hidden_layers"] = llm_layers
    if vision_layers:
        vision["depth"] = vision_layers
    return _instantiate(Qwen2VLForConditionalGeneration, Qwen2VLConfig(vision_config=vision, text_config=text, **QWEN_IDS), device, dtype)


def visual_tokens(model) -> int:
    """Visual tokens per image of the bench's inputs."""
    vc = model.config.vision_config
    if model.config.model_type == "qwen2_vl":
        return (QWEN_SIDE // vc.patch_size) ** 2 // vc.spatial_merge_size**2
    return (vc.image_size // vc.patch_size) ** 2


def build(size: str, device: str, dtype: torch.dtype, llm_layers: int | None = None, vision_layers: int | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if size.startswith("qwen"):
        return build_qwen(size, device, dtype, llm_layers, vision_layers)
    if size == "tiny":
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=336, patch_size=14)
        text = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)
    elif size == "llava-7b":  # llava-hf/llava-1.5-7b-hf's shapes
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    else:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    if llm_layers:
        text.num_hidden_layers = llm_layers
    if vision_layers:
        vision.num_hidden_layers = vision_layers
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000 if size != "tiny" else 3)
    return _instantiate(LlavaForConditionalGeneration, config, device, dtype)


def inputs_for(model, batch: int, prompt_len: int = 40, device: str = "cpu") -> dict:
    cfg = model.config
    n_img = visual_tokens(model)
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(4, min(cfg.text_config.vocab_size, 30000), (batch, prompt_len), generator=gen)
    if cfg.model_type == "qwen2_vl":
        vc = cfg.vision_config
        image = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
        ids = torch.cat([torch.tensor(image).expand(batch, -1), text], 1)
        grid = QWEN_SIDE // vc.patch_size
        pixels = torch.randn(batch * grid * grid, 3 * vc.temporal_patch_size * vc.patch_size**2, generator=gen)
        return {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, next(model.parameters()).dtype),
            "image_grid_thw": torch.tensor([[1, grid, grid]] * batch, device=device),
            "mm_token_type_ids": (ids == cfg.image_token_id).int().to(device),
        }
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
    n_img = visual_tokens(model)
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
    parser.add_argument("--size", default="tiny", choices=SIZES)
    parser.add_argument("--methods", default="visionzip,divprune,fastv")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--llm-layers", type=int, default=None, help="override the LLM depth (smoke tests)")
    parser.add_argument("--vision-layers", type=int, default=None, help="override the vision depth (smoke tests)")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    for name in methods:  # before any model is built: one line, exit status 1
        try:
            vlmprune.get_method(name)
        except ValueError as e:
            raise SystemExit(f"vlmprune bench: --methods: {e}")
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise SystemExit(f"vlmprune bench: --batch must be comma-separated integers, got {args.batch!r}")
    if args.repeats < 1 or min(batches) < 1:
        raise SystemExit("vlmprune bench: --repeats and --batch must be >= 1")
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    run(
        size=args.size,
        methods=methods,
        batches=batches,
        device=args.device,
        dtype=dtype,
        repeats=args.repeats,
        llm_layers=args.llm_layers,
        vision_layers=args.vision_layers,
    )
