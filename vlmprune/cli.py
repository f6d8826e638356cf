"""The ``vlmprune`` command: ``run`` (answer a question with and without pruning), ``methods``,
``bench``, ``eval``, ``demo``, ``train-embedded``."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _budget(text: str):
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() and "." not in text else value


def _load(model_path: str | None):
    """The embedded real VLM (or ``model_path``); a tiny random LLaVA only if no real one exists."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from .embedded import embedded_path, load_embedded

    if model_path:
        processor = AutoProcessor.from_pretrained(model_path)
        return LlavaForConditionalGeneration.from_pretrained(model_path).eval(), processor, model_path
    if (embedded_path() / "config.json").exists():
        model, processor = load_embedded()
        return model, processor, "embedded easy-VQA LLaVA (assets/embedded_vlm)"
    return None, None, None


def cmd_run(args) -> None:
    import torch

    import vlmprune
    from .embedded import build_prompt
    from .eval.easyvqa import load_task

    model, processor, label = _load(args.model)
    if model is None:
        return _run_tiny(args)
    if args.image:
        from PIL import Image

        image, question, answer = Image.open(args.image).convert("RGB"), args.question, None
    else:
        sample = load_task(args.task, "test", n=args.sample + 1, seed=0)[args.sample]
        image, question, answer = sample.image, args.question or sample.question, sample.answer
    prompt = build_prompt(question)
    inputs = processor(images=image, text=prompt, return_tensors="pt")

    def answer_with(handle=None):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        text = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
        return text, time.perf_counter() - start

    full_text, full_s = answer_with()
    with vlmprune.wrap(model, args.method, budget=args.budget) as handle:
        pruned_text, pruned_s = answer_with(handle)
        stats = handle.stats
    print(json.dumps(_report(label, question, answer, args, full_text, pruned_text, full_s, pruned_s, stats), indent=2))


def _run_tiny(args) -> None:
    """No embedded model yet: prune a tiny random LLaVA (576 visual tokens) and say so."""
    import torch

    import vlmprune
    from .bench import build, inputs_for

    print(
        "note: no embedded model in assets/embedded_vlm (build it with `vlmprune train-embedded`); "
        "running a tiny LLaVA with random weights instead: its answers are meaningless token ids, "
        "the token counts, FLOPs and KV bytes are real"
    )
    model = build("tiny", "cpu", torch.float32)
    inputs = inputs_for(model, 1)

    def answer():
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1] :].tolist(), time.perf_counter() - start

    full, full_s = answer()
    with vlmprune.wrap(model, args.method, budget=args.budget) as handle:
        pruned, pruned_s = answer()
        stats = handle.stats
    print(json.dumps(_report("tiny random LLaVA", None, None, args, full, pruned, full_s, pruned_s, stats), indent=2))


def _report(label, question, answer, args, full, pruned, full_s, pruned_s, stats) -> dict:
    return {
        "model": label,
        "question": question,
        "expected": answer,
        "method": args.method,
        "budget": args.budget,
        "answer_all_tokens": full,
        "answer_pruned": pruned,
        "visual_tokens": {"before": stats["points"][0]["in"], "llm": stats["llm_visual_tokens"]},
        "seconds": {"all_tokens": round(full_s, 3), "pruned": round(pruned_s, 3)},
        "llm_prefill_flops_ratio": round(stats["llm_prefill_flops"] / stats["llm_prefill_flops_unpruned"], 3),
        "kv_cache_bytes": {"pruned": stats["kv_cache_bytes"], "unpruned": stats["kv_cache_bytes_unpruned"]},
    }


def cmd_methods(args) -> None:
    import vlmprune

    rows = vlmprune.methods(args.filter)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return
    print(f"{'name':<15} {'stages':<22} {'needs':<38} {'free':<5} paper")
    for m in rows:
        paper = f"{m['paper'].get('title', '')[:50]} ({m['paper'].get('arxiv') or '-'})"
        print(f"{m['name']:<15} {','.join(m['stages']):<22} {','.join(m['needs']):<38} {str(m['training_free']):<5} {paper}")


#: sub-commands whose own argument parser lives in another module
FORWARDED = {
    "bench": ("vlmprune.bench", "prefill time wrapped vs unwrapped"),
    "eval": ("vlmprune.eval.runner", "accuracy vs tokens kept on the offline tasks"),
    "demo": ("vlmprune.demo.app", "the Gradio demo"),
    "train-embedded": ("vlmprune.eval.train_embedded", "rebuild the embedded model"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmprune", description="Visual-token pruning for vision-language models")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer one question with all tokens and pruned (embedded model by default)")
    run.add_argument("--method", default="visionzip")
    run.add_argument("--budget", type=_budget, default=0.111, help="tokens per image (int) or fraction kept (float)")
    run.add_argument("--model", default=None, help="a LLaVA checkpoint path or hub id (default: the embedded model)")
    run.add_argument("--task", default="easyvqa-grid", choices=("easyvqa", "easyvqa-grid"))
    run.add_argument("--sample", type=int, default=0, help="which test sample of --task")
    run.add_argument("--image", default=None, help="an image file instead of a task sample (needs --question)")
    run.add_argument("--question", default=None)
    run.add_argument("--max-new-tokens", type=int, default=3)
    run.set_defaults(func=cmd_run)

    methods = sub.add_parser("methods", help="list the registered methods")
    methods.add_argument("filter", nargs="?", default="*")
    methods.add_argument("--json", action="store_true")
    methods.set_defaults(func=cmd_methods)

    for name, (_, help_text) in FORWARDED.items():
        sub.add_parser(name, help=f"{help_text} (see `vlmprune {name} --help`)")
    return parser


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in FORWARDED:
        import importlib

        importlib.import_module(FORWARDED[argv[0]][0]).main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    if args.command == "run" and args.image and not args.question:
        raise SystemExit("--image needs --question")
    args.func(args)


if __name__ == "__main__":
    main()
