"""The ``vlmprune`` command: ``run`` (answer a question with and without pruning), ``methods``,
``bench``, ``eval``, ``demo``, ``train-embedded``, ``train-vit-heads``."""

from __future__ import annotations

import argparse
import json
import sys
import time


#: visual tokens per image of the tiny random LLaVA that ``run`` falls back to (``bench.build("tiny")``)
TINY_VISUAL_TOKENS = 576


def _budget(text: str):
    """``--budget``: an int is visual tokens per image, anything else a fraction kept."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(f"{text!r} is neither a token count (int) nor a fraction kept (float)")


def _fail(message: str) -> SystemExit:
    """One line on stderr and exit status 1 (``raise _fail(...)``)."""
    return SystemExit(f"vlmprune run: {message}")


def _embedded_visual_tokens() -> int | None:
    """The embedded model's visual tokens per image (its config's ``image_seq_length``), or
    ``None`` when it is not built."""
    from .embedded import embedded_path

    file = embedded_path() / "config.json"
    return int(json.loads(file.read_text())["image_seq_length"]) if file.exists() else None


def _check_budget(budget, n_visual: int) -> None:
    from .budget import Budget

    try:
        Budget.parse(budget).resolve_target(n_visual)
    except (TypeError, ValueError) as e:
        raise _fail(f"--budget: {e}")


def _check_run_args(args) -> None:
    """Everything ``run`` can check before a model loads: the method, the budget against the
    default model's token count (a ``--model`` is checked once its inputs are built), the image."""
    import os

    from .registry import get_method

    try:
        get_method(args.method)
    except ValueError as e:
        raise _fail(f"--method: {e}")
    if args.image and not args.question:
        raise _fail("--image needs --question")
    if args.image and not os.path.isfile(args.image):
        raise _fail(f"--image: no such file: {args.image}")
    if args.repeats < 1 or args.max_new_tokens < 1:
        raise _fail("--repeats and --max-new-tokens must be >= 1")
    if args.model is None:
        _check_budget(args.budget, _embedded_visual_tokens() or TINY_VISUAL_TOKENS)


def _load(model_path: str | None):
    """The embedded real VLM (or ``model_path``: any LLaVA-family checkpoint or embedded-style
    directory, through ``vlmprune.eval.runner.load_model``); a tiny random LLaVA only if no real
    one exists."""
    from .embedded import embedded_path, load_embedded

    if model_path:
        from .eval.runner import load_model

        model, processor = load_model(model_path, dtype="float32")
        return model, processor, model_path
    if (embedded_path() / "config.json").exists():
        model, processor = load_embedded()
        return model, processor, "embedded easy-VQA LLaVA (assets/embedded_vlm)"
    return None, None, None


def _timed(call, repeats: int):
    """``call()``'s result and its median wall time over ``repeats`` calls after one warm-up."""
    import statistics

    result = call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def _serves(model, args, n_visual: int) -> None:
    """Refuse, before generating, a budget above ``n_visual`` or a method the model cannot serve."""
    import vlmprune

    _check_budget(args.budget, n_visual)
    try:
        vlmprune.wrap(model, args.method, budget=args.budget).unwrap()
    except (TypeError, ValueError, NotImplementedError) as e:
        raise _fail(f"--method {args.method}: {e}")


def cmd_run(args) -> None:
    import torch

    import vlmprune
    from .embedded import build_prompt
    from .eval.easyvqa import load_task

    _check_run_args(args)
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
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    _serves(model, args, n_visual)

    def generate():
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()

    full_text, full_s = _timed(generate, args.repeats)
    with vlmprune.wrap(model, args.method, budget=args.budget) as handle:
        pruned_text, pruned_s = _timed(generate, args.repeats)
        stats = handle.stats
    _print(_report(label, question, answer, args, n_visual, full_text, pruned_text, full_s, pruned_s, stats), args)


def _run_tiny(args) -> None:
    """No embedded model yet: prune a tiny random LLaVA (576 visual tokens) and say so."""
    import torch

    import vlmprune
    from .tools.bench import build, inputs_for

    print(
        "note: no embedded model in assets/embedded_vlm (build it with `vlmprune train-embedded`); "
        "running a tiny LLaVA with random weights instead: its answers are meaningless token ids, "
        "the token counts, FLOPs and KV bytes are real",
        file=sys.stderr,
    )
    model = build("tiny", "cpu", torch.float32)
    inputs = inputs_for(model, 1)
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    _serves(model, args, n_visual)

    def generate():
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    full, full_s = _timed(generate, args.repeats)
    with vlmprune.wrap(model, args.method, budget=args.budget) as handle:
        pruned, pruned_s = _timed(generate, args.repeats)
        stats = handle.stats
    _print(_report("tiny random LLaVA", None, None, args, n_visual, full, pruned, full_s, pruned_s, stats), args)


def _report(label, question, answer, args, n_visual, full, pruned, full_s, pruned_s, stats) -> dict:
    after = stats["points"][-1]["out"] if stats["points"] else stats["llm_visual_tokens"]
    return {
        "model": label,
        "question": question,
        "expected": answer,
        "method": args.method,
        "budget": args.budget,
        "answer_all_tokens": full,
        "answer_pruned": pruned,
        "visual_tokens": {"before": [n_visual], "llm": stats["llm_visual_tokens"], "after_last_point": after},
        "seconds": {"all_tokens": round(full_s, 4), "pruned": round(pruned_s, 4)},
        "timing": f"median of {args.repeats} generate() calls of {args.max_new_tokens} new tokens after one warm-up",
        "llm_prefill_flops_ratio": round(stats["llm_prefill_flops"] / stats["llm_prefill_flops_unpruned"], 3),
        "kv_cache_bytes": {"pruned": stats["kv_cache_bytes"], "unpruned": stats["kv_cache_bytes_unpruned"]},
    }


def _size(n: float) -> str:
    """Bytes in B, KiB or MiB."""
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _pct(ratio: float) -> str:
    return f"{ratio * 100:.1f} %"


def _print(report: dict, args) -> None:
    """``--json``: the report as JSON; otherwise a short summary for a person."""
    if args.json:
        print(json.dumps(report, indent=2))
        return
    tokens, kv = report["visual_tokens"], report["kv_cache_bytes"]
    before, llm, after = tokens["before"][0], tokens["llm"][0], tokens["after_last_point"][0]
    kept = f"{after}" if llm == after else f"{llm} -> {after}"
    print(f"model: {report['model']}")
    if report["question"]:
        expected = f"   (expected: {report['expected']})" if report["expected"] else ""
        print(f"question: {report['question']}{expected}")
    rows = [
        ("", "answer", "visual tokens", "LLM FLOPs", "KV cache", "time"),
        ("all tokens", str(report["answer_all_tokens"]), str(before), "100 %", _size(kv["unpruned"]),
         f"{report['seconds']['all_tokens'] * 1000:.0f} ms"),
        (f"{report['method']} @ {report['budget']}", str(report["answer_pruned"]), f"{kept} ({_pct(after / before)})",
         _pct(report["llm_prefill_flops_ratio"]), f"{_size(kv['pruned'])} ({_pct(kv['pruned'] / kv['unpruned'])})",
         f"{report['seconds']['pruned'] * 1000:.0f} ms"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    print(f"time: {report['timing']}; `vlmprune bench` times the prefill alone. --json for all fields.")


def cmd_methods(args) -> None:
    import vlmprune

    rows = vlmprune.methods(args.filter)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        raise SystemExit(f"vlmprune methods: no method matches {args.filter!r}; `vlmprune methods` lists them all")
    table = [("name", "stages", "reads (signals)", "trained weights", "paper")]
    for m in rows:
        paper = m["paper"]
        title = paper.get("title") or "-"
        table.append((m["name"], ",".join(m["stages"]), ",".join(m["needs"]) or "-",
                      "required" if not m["training_free"] else "optional" if m["accepts_weights"] else "-",
                      f"{title} (arXiv {paper['arxiv']})" if paper.get("arxiv") else title))
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths)) + "  " + r[4])
    print("\ntrained weights: required = the method runs a trained module (shipped for the embedded model, "
          "wrap(..., weights=path) elsewhere); optional = training-free by default, weights= switches to the "
          "trained variant.\nOptions with defaults and choices, positions: vlmprune methods NAME --json")


#: sub-commands whose own argument parser lives in another module
FORWARDED = {
    "bench": ("vlmprune.tools.bench", "prefill time wrapped vs unwrapped"),
    "eval": ("vlmprune.eval.runner",
             ("accuracy vs tokens kept on the offline tasks (--task easyvqa-reach: the closed-loop VLA benchmark; "
              "--task easyvqa-retrieval: the retrieval benchmark; --task easyvqa-t2i: the text-to-image benchmark)")),
    "demo": ("vlmprune.demo.app", "the Gradio demo"),
    "train-embedded": ("vlmprune.embedded.training", "rebuild the embedded model"),
    "train-vit-heads": ("vlmprune.embedded.vit_training", "train the embedded ViT's classification and segmentation heads"),
}


#: ``vlmprune eval --task <name>`` tasks run by their own benchmark module, not the VQA runner
EVAL_TOOLS = {"easyvqa-reach": "vlmprune.tools.eval_reach", "easyvqa-retrieval": "vlmprune.tools.eval_retrieval",
              "easyvqa-t2i": "vlmprune.tools.eval_diffusion"}


def _eval_tool(argv: list[str]) -> str | None:
    """The module of :data:`EVAL_TOOLS` that ``vlmprune eval --task <name> ...`` runs (the
    closed-loop VLA, retrieval and text-to-image benchmarks), or None (the VQA runner)."""
    for i, a in enumerate(argv):
        name = a[len("--task="):] if a.startswith("--task=") else argv[i + 1] if a == "--task" and i + 1 < len(argv) else None
        if name in EVAL_TOOLS:
            return EVAL_TOOLS[name]
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmprune", description="Visual-token pruning for vision-language models")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="answer one question with all tokens and pruned (embedded model by default)",
        description="Answer one question with all visual tokens and pruned, and print both answers, the visual "
                    "tokens kept, LLM prefill FLOPs and KV-cache bytes, and the median generate() time of "
                    "--repeats calls after one warm-up (`vlmprune bench` times the prefill alone). Arguments are "
                    "checked before the model loads.")
    run.add_argument("--method", default="visionzip", help="a registered method (`vlmprune methods`; default visionzip)")
    run.add_argument("--budget", type=_budget, default=0.111, help="tokens per image (int) or fraction kept (float)")
    run.add_argument("--model", default=None, help="a LLaVA checkpoint path or hub id (default: the embedded model)")
    run.add_argument("--task", default="easyvqa-grid", choices=("easyvqa", "easyvqa-grid", "easyvqa-scenes"))
    run.add_argument("--sample", type=int, default=0, help="which test sample of --task")
    run.add_argument("--image", default=None, help="an image file instead of a task sample (needs --question)")
    run.add_argument("--question", default=None)
    run.add_argument("--max-new-tokens", type=int, default=3)
    run.add_argument("--repeats", type=int, default=3, help="timed generate() calls per side after one warm-up (default 3)")
    run.add_argument("--json", action="store_true", help="print every figure as JSON (for scripts)")
    run.set_defaults(func=cmd_run)

    methods = sub.add_parser(
        "methods", help="list the registered methods",
        description="A table of the registered methods: stages, the signals each reads, whether it has a trained "
                    "module, and its paper. Each method's options (defaults, choices, docs), positions and "
                    "weights are shown only with --json.")
    methods.add_argument("filter", nargs="?", default="*", help="a name or fnmatch pattern (default: all)")
    methods.add_argument("--json", action="store_true", help="every field, with each method's options and defaults")
    methods.set_defaults(func=cmd_methods)

    for name, (_, help_text) in FORWARDED.items():
        sub.add_parser(name, help=f"{help_text} (see `vlmprune {name} --help`)")
    return parser


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    tool = _eval_tool(argv[1:]) if argv[:1] == ["eval"] else None
    if tool is not None:
        import importlib

        importlib.import_module(tool).main(argv[1:])
        return
    if argv and argv[0] in FORWARDED:
        import importlib

        importlib.import_module(FORWARDED[argv[0]][0]).main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
