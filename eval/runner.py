"""``vlmprune eval``: accuracy against visual tokens kept, for methods x budgets, offline.

    vlmprune eval                                   # every method, keep 100/33.3/22.2/11.1 %
    python -m vlmprune.eval.runner --methods fastv,visionzip --budgets 0.333,64 --limit 100
    python -m vlmprune.eval.runner --model /path/to/llava-hf-checkpoint --tasks easyvqa
    vlmprune eval --methods atp:weights=assets/atp_embedded.safetensors --update   # add rows

A method is ``NAME`` or ``NAME:KEY=VALUE[:KEY=VALUE...]`` (options passed to ``wrap()``; the
rows are labelled ``NAME[KEY=VALUE,...]``). ``--update`` merges the new rows into the results
already in ``--out``.

For each method and budget it wraps the model (``vlmprune.wrap``), answers the questions of
each task in batches with greedy decoding, unwraps, and records accuracy (exact match of the
normalised one-word answer), the visual tokens per image measured from ``handle.stats``
(``tokens_kept``: the mean over the LLM's decoder layers of the visual tokens each one
processes, which is exactly the budget for methods that prune before the LLM and the
layer-averaged "equivalent tokens" for methods that prune inside it; ``tokens_final``: left
after the last pruning point; ``llm_input_tokens``: entering the LLM), the LLM prefill FLOPs
relative to the unpruned model, and the wall time. Output in ``--out``: ``results.csv``,
``results.json`` and ``accuracy_vs_tokens.png`` (one panel per task, one line per method,
x = ``tokens_kept``).

Defaults: the embedded model (``vlmprune.embedded.load_embedded``); both offline tasks
(``easyvqa``, ``easyvqa-grid``); the first :data:`DEFAULT_LIMIT` questions of each task's
committed index, which is in a seeded random order, so this is a fixed seeded random subset
(``--limit`` changes its size); every registered method except ``fixed`` (methods whose
``check()`` refuses the model are skipped with the reason logged, while a misspelled name or
option, or a ``weights=`` file that does not load, stops the run before the model loads); budgets
:data:`DEFAULT_BUDGETS` (LLaVA-1.5's 576 / 192 / 128 / 64 tokens as fractions kept).

Keep-all budgets (1.0, or an int equal to the token count) prune nothing, whatever the method
(the keep-all truth test of every method guarantees identical outputs), so by default they are
measured once per task with the unwrapped model and reported as method ``none``; the plot
starts every method's line from that point. ``--full-per-method`` runs them under every method
instead.

Cost: the default run is 1 + 3 x (number of methods) runs of 2 x 300 questions, and the vision
tower is most of each forward. Measured on 2 CPU cores shared with other jobs (AMD EPYC with
AVX512-BF16, ``--threads 1``): about 9 questions/s averaged over the 16 methods registered at the
time in bfloat16 (``--dtype auto`` picks it on such CPUs; 13/s unpruned, 5.5/s in float32), i.e.
about 50 minutes for the default run. ``--threads``: torch's default uses every core, fastest on
an idle machine but several times slower when other processes keep the cores busy (a warning
says so when the load average exceeds the core count).

The same engine (:func:`load_model`, :class:`Predictor`) serves the lmms-eval plugin
(``vlmprune.eval.lmms_plugin``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("vlmprune.eval")

DEFAULT_BUDGETS = (1.0, 0.333, 0.222, 0.111)
DEFAULT_LIMIT = 300
DEFAULT_EXCLUDED = ("fixed",)
#: LLaVA-1.5's short-answer instruction, appended for checkpoints other than the embedded model
LLAVA_SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
#: results.csv columns. ``budget``: fraction kept; ``budget_tokens``: the per-image target it
#: resolves to; ``tokens_kept``: measured visual tokens per image, mean over the LLM's layers (the
#: plot's x); ``tokens_final``: left after the last pruning point; ``llm_input_tokens``: entering
#: the LLM; ``flops_ratio``: LLM prefill FLOPs relative to the unpruned model (handle.stats).
CSV_FIELDS = (
    "task", "method", "budget", "budget_arg", "budget_tokens", "tokens_kept", "tokens_final",
    "llm_input_tokens", "tokens_total", "flops_ratio", "accuracy", "correct", "questions", "wall_s",
)


# ============================================================================ model loading


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(dtype="auto", device="cpu") -> torch.dtype:
    """A torch dtype from a name. ``"auto"``: bfloat16 on CUDA and on CPUs with native bf16
    (AVX512-BF16 / AMX; there it runs the embedded model about 2.4x faster than float32 with the
    same answers on the questions checked), float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if str(device).startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if str(device) == "cpu" and _cpu_has_native_bf16() else torch.float32
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be 'auto' or a torch dtype name such as 'float32' or 'bfloat16', got {dtype!r}")
    return value


def is_embedded(model) -> bool:
    """Whether ``model`` (a path, ``None`` or ``"embedded"``) names the embedded model, i.e. a
    LLaVA with a Dinov2 tower whose vision weights are rebuilt by ``load_embedded``
    (:func:`vlmprune.embedded.is_embedded_dir`)."""
    if model in (None, "", "embedded"):
        return True
    from vlmprune.embedded import is_embedded_dir

    return is_embedded_dir(str(model))


def load_model(model=None, device="cpu", dtype="auto", attn_implementation="sdpa"):
    """``(model, processor)`` for a LLaVA-family checkpoint, offline-capable.

    ``model``: ``None`` / ``"embedded"`` for the embedded model, the path of an embedded-style
    directory (no vision weights), or any local path or hub id of a transformers LLaVA-family
    checkpoint (``llava``, ``llava_next``, ``llava_onevision``; others through
    ``AutoModelForImageTextToText``, which ``vlmprune.wrap`` may refuse). A checkpoint missing
    weights (which transformers would initialise randomly) is refused."""
    dt = resolve_dtype(dtype, device)
    if is_embedded(model):
        from vlmprune.embedded import load_embedded

        path = None if model in (None, "", "embedded") else Path(str(model)).expanduser()
        m, processor = load_embedded(path, device=device, dtype=dt, attn_implementation=attn_implementation)
    else:
        import transformers
        from transformers import AutoConfig, AutoProcessor

        config = AutoConfig.from_pretrained(model)
        classes = {
            "llava": "LlavaForConditionalGeneration",
            "llava_next": "LlavaNextForConditionalGeneration",
            "llava_onevision": "LlavaOnevisionForConditionalGeneration",
        }
        cls = getattr(transformers, classes.get(config.model_type, "AutoModelForImageTextToText"))
        m, info = cls.from_pretrained(model, dtype=dt, attn_implementation=attn_implementation,
                                      output_loading_info=True)
        refuse_missing_weights(model, info)
        m = m.to(device).eval()
        processor = AutoProcessor.from_pretrained(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # batched generation
    return m, processor


def refuse_missing_weights(name, info: dict) -> None:
    """Raise if ``from_pretrained``'s loading ``info`` lists missing weights: transformers
    initialises them randomly and only logs it, so the answers would be noise."""
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"{name}: {len(missing)} weights are missing from the checkpoint (e.g. {missing[0]}), so "
            "transformers would initialise them randomly; give a complete checkpoint"
            + (" (an embedded-style directory without vision weights loads with vlmprune.embedded.load_embedded)"
               if any("vision_tower" in k for k in missing) else "")
        )


# ============================================================================ answering


def visual_token_counts(stats: dict, n_layers: int) -> dict[str, list[float]] | None:
    """Visual tokens per image at the last prefill, from ``handle.stats``, or ``None``.

    ``llm_input``: entering the language model; ``final``: left after the method's last pruning
    point; ``kept``: the mean over the LLM's ``n_layers`` decoder layers of the visual tokens each
    layer processes (a point ``llm:K`` acts before layer ``K``). ``kept`` equals the budget for
    methods that prune before the LLM, and is the field's layer-averaged "equivalent tokens" for
    methods that prune inside it (FastV, progressive schedules). ``cache``-stage points (after
    prefill) do not change the prefill counts."""
    llm_in = [float(n) for n in stats.get("llm_visual_tokens") or []]
    points = stats.get("points") or []
    if not llm_in:
        if not points:
            return None
        llm_in = [float(n) for n in points[-1]["out"]]
    per_layer = [[n] * n_layers for n in llm_in]
    final = list(llm_in)
    for p in points:
        stage, _, layer = str(p["point"]).partition(":")
        if stage != "llm" or len(p["out"]) != len(llm_in):
            continue
        k = int(layer) if layer else 0
        for i, n in enumerate(p["out"]):
            for l in range(max(k, 0), n_layers):
                per_layer[i][l] = float(n)
            final[i] = float(n)
    return {
        "llm_input": llm_in,
        "final": final,
        "kept": [sum(row) / len(row) if row else 0.0 for row in per_layer],
    }


@dataclass
class VisualTokens:
    """Visual tokens per image of one question (the mean over its images), as
    :func:`visual_token_counts` defines them."""

    kept: float  # mean over the LLM's layers
    final: float  # left after the method's last pruning point
    llm_input: float  # entering the language model


class Predictor:
    """Greedy batched answers of a LLaVA-family model, with the visual tokens each image kept.

    ``post_prompt`` is appended to every question (``None``: nothing for the embedded model,
    :data:`LLAVA_SHORT_ANSWER` otherwise); prompts go through the processor's chat template
    (the embedded model's renders ``"<image>" + question + " Answer:"``)."""

    def __init__(self, model, processor, post_prompt: str | None = "", max_new_tokens: int = 4):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.post_prompt = post_prompt or ""
        self.max_new_tokens = int(max_new_tokens)
        cfg = model.config
        self.image_token_id = getattr(cfg, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(cfg, "image_token_index", None)
        text_cfg = getattr(cfg, "text_config", cfg)
        self.n_layers = int(getattr(text_cfg, "num_hidden_layers", 1) or 1)
        self.handle = None  # the active vlmprune handle, if any
        self.last_stats: dict = {}

    @property
    def device(self):
        return next(self.model.parameters()).device

    def prompt(self, text: str, n_images: int = 1) -> str:
        content = [{"type": "image"} for _ in range(n_images)]
        content.append({"type": "text", "text": text.strip() + self.post_prompt})
        messages = [{"role": "user", "content": content}]
        if getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        token = getattr(self.processor, "image_token", "<image>")
        return "".join(f"{token}\n" for _ in range(n_images)) + text.strip() + self.post_prompt

    @torch.inference_mode()
    def generate(self, images: list, texts: list[str], max_new_tokens: int | None = None,
                 until: list[str] | None = None) -> tuple[list[str], list[VisualTokens]]:
        """``images[i]``: a PIL image or a list of them for ``texts[i]``. Returns the decoded
        answers and, per question, the visual tokens per image."""
        per_row = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        prompts = [self.prompt(t, len(ims)) for t, ims in zip(texts, per_row)]
        flat = [im for ims in per_row for im in ims]
        inputs = self.processor(images=flat or None, text=prompts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        out = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens or self.max_new_tokens, do_sample=False, num_beams=1,
            pad_token_id=pad,
        )
        new = out[:, inputs["input_ids"].shape[1]:]
        answers = [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
        if until:
            answers = [_cut(a, until) for a in answers]
        return answers, self._tokens(inputs["input_ids"], per_row)

    def _tokens(self, input_ids, per_row) -> list[VisualTokens]:
        """Per question: its visual tokens per image."""
        counts = [len(ims) for ims in per_row]
        per_image = None
        if self.handle is not None:
            self.last_stats = self.handle.stats
            per_image = visual_token_counts(self.last_stats, self.n_layers)
        if per_image is None:  # unwrapped: every placeholder token reaches every layer
            if self.image_token_id is None:
                return [VisualTokens(math.nan, math.nan, math.nan) for _ in counts]
            total = (input_ids == self.image_token_id).sum(1).tolist()
            return [VisualTokens(v, v, v) for v in (t / c if c else 0.0 for t, c in zip(total, counts))]
        out = []
        aligned = len(per_image["kept"]) == sum(counts)
        i = 0
        for c in counts:

            def mean(values, i=i, c=c):
                part = values[i:i + c] if aligned else values
                return sum(part) / len(part) if c and part else 0.0

            out.append(VisualTokens(mean(per_image["kept"]), mean(per_image["final"]), mean(per_image["llm_input"])))
            i += c
        return out


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text.strip()


# ============================================================================ the benchmark


def _parse_budget(text: str):
    text = text.strip()
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"budget {text!r} is neither an int (tokens) nor a float (fraction)")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a fractional budget must be in (0, 1], got {value}")
    if isinstance(value, int) and value < 1:
        raise argparse.ArgumentTypeError(f"a token budget must be >= 1, got {value}")
    return value


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_method_spec(spec: str) -> tuple[str, str, dict]:
    """``NAME`` or ``NAME:KEY=VALUE[:KEY=VALUE...]`` -> (label, name, wrap options). Values are
    parsed as int, float or kept as strings (e.g. ``atp:weights=assets/atp_embedded.safetensors``);
    the label names path-like values by their file name."""
    name, *parts = spec.split(":")
    options, shown = {}, []
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise SystemExit(f"vlmprune eval: --methods: {spec!r}: options are written KEY=VALUE after the name, "
                             "e.g. atp:weights=path")
        parsed = value
        for cast in (int, float):
            try:
                parsed = cast(value)
                break
            except ValueError:
                continue
        options[key] = parsed
        shown.append(f"{key}={Path(value).name if '/' in value else value}")
    label = name + (f"[{','.join(shown)}]" if shown else "")
    return label, name, options


def wrap_parameters() -> dict:
    """The ``wrap()`` parameters a method spec may carry besides the method's own options:
    ``weights`` and every registered adapter's options (name -> its ``AdapterOption``; the
    model's own adapter checks them again at ``wrap()``)."""
    from vlmprune.adapters import ADAPTERS

    out = {"weights": None}
    for adapter in ADAPTERS:
        for key, opt in adapter.options.items():
            out.setdefault(key, opt)
    return out


def validate_methods(specs: list[str]) -> list[tuple[str, str, dict]]:
    """Parse and check every method spec without a model: the name is registered, each option is
    one of the method's (or a ``wrap()`` parameter) with a valid value, and ``weights=`` loads.
    Returns ``(label, name, options)`` per spec; the first bad spec exits with its reason."""
    import vlmprune

    wrap_options = wrap_parameters()
    out = []
    for spec in specs:
        label, name, options = parse_method_spec(spec)
        where = f"vlmprune eval: --methods {spec!r}"
        try:
            cls = vlmprune.get_method(name)
        except ValueError as e:
            raise SystemExit(f"{where}: {e}")
        own = {k: v for k, v in options.items() if k not in wrap_options}
        valid = list(cls.options()) + list(wrap_options)
        unknown = sorted(set(own) - set(cls.options()))
        if unknown:
            raise SystemExit(f"{where}: unknown option(s) {unknown} for method {name!r}; valid options: {valid}")
        try:
            instance = cls(**own)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"{where}: {e}")
        for key, opt in wrap_options.items():
            if opt is not None and key in options and options[key] not in opt.choices:
                raise SystemExit(f"{where}: {key} must be one of {list(opt.choices)}, got {options[key]!r}")
        if "weights" in options:
            if not cls.accepts_weights:
                raise SystemExit(f"{where}: method {name!r} takes no weights (weights= is for "
                                 f"{[m['name'] for m in vlmprune.methods() if m['accepts_weights']]})")
            try:
                instance.load_weights(options["weights"])
            except Exception as e:  # noqa: BLE001 - a missing file, not a weights file, a wrong kind
                raise SystemExit(f"{where}: weights={options['weights']!r} does not load: "
                                 f"{type(e).__name__}: {e}")
        out.append((label, name, options))
    return out


def default_methods() -> list[str]:
    import vlmprune

    return [m["name"] for m in vlmprune.methods() if m["name"] not in DEFAULT_EXCLUDED]


def _is_keep_all(budget, n_visual: int) -> bool:
    return (isinstance(budget, float) and budget >= 1.0) or (isinstance(budget, int) and budget == n_visual)


def _fraction(budget, n_visual: int) -> float:
    return float(budget) if isinstance(budget, float) else budget / n_visual


def _visual_count(model, processor, sample) -> int:
    """Visual tokens per image the unpruned model sees (from one processed prompt)."""
    pred = Predictor(model, processor)
    inputs = processor(images=[sample["image"]], text=[pred.prompt(sample["question"])], return_tensors="pt")
    return int((inputs["input_ids"] == pred.image_token_id).sum())


def evaluate(predictor: Predictor, samples: list[dict], batch_size: int, bar=None) -> dict:
    """Answer ``samples`` in batches: accuracy, visual tokens (means), FLOPs ratio, wall time."""
    from vlmprune.eval.tasks import exact_match

    correct, tokens, ratios = 0, [], []
    t0 = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        answers, kept = predictor.generate([s["image"] for s in chunk], [s["question"] for s in chunk])
        correct += sum(exact_match(a, s["answer"]) for a, s in zip(answers, chunk))
        tokens.extend(kept)
        st = predictor.last_stats if predictor.handle is not None else {}
        if st.get("llm_prefill_flops_unpruned"):
            ratios.append(st["llm_prefill_flops"] / st["llm_prefill_flops_unpruned"])
        if bar is not None:
            bar.update(len(chunk))
    wall = time.perf_counter() - t0

    def mean(key):
        return sum(getattr(t, key) for t in tokens) / len(tokens)

    return {
        "accuracy": correct / len(samples),
        "correct": int(correct),
        "questions": len(samples),
        "tokens_kept": mean("kept"),
        "tokens_final": mean("final"),
        "llm_input_tokens": mean("llm_input"),
        "flops_ratio": sum(ratios) / len(ratios) if ratios else 1.0,
        "wall_s": wall,
    }


def run_benchmark(model, processor, tasks: dict[str, list[dict]], methods: list[str], budgets: list,
                  batch_size: int = 16, post_prompt: str | None = "", full_per_method: bool = False,
                  max_new_tokens: int = 4, progress: bool = True) -> tuple[list[dict], dict[str, str]]:
    """Rows of results (one per task x method x budget, plus ``none`` at keep-all unless
    ``full_per_method``) and ``{method: reason}`` for the methods this model does not serve
    (skipped). Before any question is answered it exits (``SystemExit``) on a bad method spec
    (:func:`validate_methods`), a token budget above the model's count, every method skipped,
    or nothing to run."""
    import vlmprune
    from tqdm import tqdm

    first = next(iter(tasks.values()))[0]
    n_visual = _visual_count(model, processor, first)
    skipped: dict[str, str] = {}
    usable = []
    for label, name, options in validate_methods(methods):
        try:  # the method's own check() (and the adapter's) decide whether this model serves it
            vlmprune.wrap(model, method=name, budget=1.0, **options).unwrap()
        except (ValueError, TypeError, NotImplementedError, FileNotFoundError) as e:
            skipped[label] = str(e)
            log.warning("skipping method %r: %s", label, e)
            continue
        usable.append((label, name, options))
    if methods and not usable:
        raise SystemExit("vlmprune eval: this model serves none of the methods asked for:\n"
                         + "\n".join(f"  {m}: {why}" for m, why in skipped.items()))

    too_many = [b for b in budgets if isinstance(b, int) and b > n_visual]
    if too_many:
        raise SystemExit(f"vlmprune eval: --budgets {too_many}: this model has {n_visual} visual tokens per "
                         f"image; a token budget must be in [1, {n_visual}] (or a fraction in (0, 1])")
    # the work list: (method or None, budget)
    runs = []
    keep_all = [b for b in budgets if _is_keep_all(b, n_visual)]
    if keep_all and not full_per_method:
        runs.append((None, keep_all[0]))
    for m in usable:
        for b in budgets:
            if _is_keep_all(b, n_visual) and not full_per_method:
                continue
            runs.append((m, b))
    if not runs:
        raise SystemExit("vlmprune eval: nothing to evaluate: no method given and no keep-all budget "
                         "(1.0) in --budgets")
    total = len(runs) * sum(len(s) for s in tasks.values())
    bar = tqdm(total=total, unit="q", desc="vlmprune eval", disable=not progress, dynamic_ncols=True)
    predictor = Predictor(model, processor, post_prompt=post_prompt, max_new_tokens=max_new_tokens)
    rows = []
    try:
        for spec, budget in runs:
            method = None if spec is None else spec[0]
            handle = None if spec is None else vlmprune.wrap(model, method=spec[1], budget=budget, **spec[2])
            predictor.handle = handle
            try:
                for task, samples in tasks.items():
                    bar.set_postfix_str(f"{method or 'none'} @ {budget} on {task}")
                    r = evaluate(predictor, samples, batch_size, bar)
                    fraction = _fraction(budget, n_visual)
                    row = {
                        "task": task, "method": method or "none", "budget": round(fraction, 4),
                        "budget_arg": budget, "budget_tokens": max(1, round(fraction * n_visual)),
                        "tokens_kept": round(r["tokens_kept"], 2), "tokens_final": round(r["tokens_final"], 2),
                        "llm_input_tokens": round(r["llm_input_tokens"], 2), "tokens_total": n_visual,
                        "flops_ratio": round(r["flops_ratio"], 4), "accuracy": round(r["accuracy"], 4),
                        "correct": r["correct"], "questions": r["questions"], "wall_s": round(r["wall_s"], 2),
                    }
                    rows.append(row)
                    bar.write(
                        f"{task:13s} {row['method']:14s} keep {row['budget']:.3f} -> {row['tokens_kept']:6.1f} tokens: "
                        f"accuracy {row['accuracy'] * 100:5.1f} % ({row['correct']}/{row['questions']}), {row['wall_s']:.0f} s"
                    )
            finally:
                predictor.handle = None
                if handle is not None:
                    handle.unwrap()
    finally:
        bar.close()
    return rows, skipped


# ============================================================================ outputs


def merge_results(path: Path, rows: list[dict], skipped: dict[str, str], subset: dict[str, int]):
    """``--update``: the rows of ``path`` (an earlier ``results.json``) whose method was not run
    now, followed by the new rows; returns (rows, skipped, the earlier runs' commands)."""
    with open(path) as f:
        old = json.load(f)
    if old["config"]["tasks"] != subset:
        raise SystemExit(f"vlmprune eval: --update: {path} holds tasks {old['config']['tasks']}, this run "
                         f"{subset}; use the same --tasks and --limit or another --out")
    new_methods = {r["method"] for r in rows} | set(skipped)
    kept = [r for r in old["rows"] if r["method"] not in new_methods]
    old_skipped = {m: why for m, why in old["config"].get("skipped", {}).items() if m not in new_methods}
    commands = old["config"].get("earlier_commands", []) + [old["config"]["command"]]
    return kept + rows, {**old_skipped, **skipped}, commands


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """One panel per task: accuracy against visual tokens kept (mean over LLM layers), one line
    per method (dashed for a method run with options), every line starting from the shared
    all-tokens point when there is one."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "none"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.0 * len(tasks), 4.8), squeeze=False)
    cmap = plt.get_cmap("tab20")
    markers = "osD^v<>ph*Xd"
    handles = {}
    for ax, task in zip(axes[0], tasks):
        task_rows = [r for r in rows if r["task"] == task]
        base = [r for r in task_rows if r["method"] == "none"]
        for k, m in enumerate(methods):
            pts = [(r["tokens_kept"], r["accuracy"] * 100) for r in task_rows if r["method"] == m]
            pts = sorted(pts + [(b["tokens_kept"], b["accuracy"] * 100) for b in base])
            if pts:
                variant = "[" in m  # a method with options (NAME:KEY=VALUE): dashed
                (line,) = ax.plot(*zip(*pts), marker=markers[k % len(markers)], color=cmap(k % 20),
                                  label=m, linewidth=1.3, markersize=4.5, linestyle="--" if variant else "-")
                handles.setdefault(m, line)
        for b in base:
            ax.axhline(b["accuracy"] * 100, color="gray", linestyle=":", linewidth=1)
            (star,) = ax.plot([b["tokens_kept"]], [b["accuracy"] * 100], marker="*", color="black",
                              markersize=11, linestyle="none", label="all tokens", zorder=5)
            handles.setdefault("all tokens", star)
        accs = [r["accuracy"] * 100 for r in task_rows]
        if accs:
            lo, hi = min(accs), max(accs)
            ax.set_ylim(max(0.0, lo - 5), min(101.0, max(hi + 3, lo + 10)))
        ticks = sorted({r.get("budget_tokens") or r["tokens_kept"] for r in task_rows})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{x:g}" for x in ticks])
        ax.set_xlim(0, max([r["tokens_kept"] for r in task_rows] + ticks) * 1.04)
        n = max((r["questions"] for r in task_rows), default=0)
        ax.set_title(f"{task} ({n} questions)")
        ax.set_xlabel("visual tokens per image (mean over LLM layers)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    """Accuracy (%) per task and method, one column per budget (fraction kept and its tokens)."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        tr = [r for r in rows if r["task"] == task]
        budgets = sorted({r["budget"] for r in tr}, reverse=True)
        cols = []
        for b in budgets:
            toks = sorted({r["budget_tokens"] for r in tr if r["budget"] == b})
            label = f"{b * 100:.1f} %"
            if len(toks) == 1:
                label += f" ({toks[0]:g} tok)"
            cols.append(label)
        n = max(r["questions"] for r in tr)
        lines += [f"**{task}** ({n} questions)", "", "| method | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        base = {r["budget"]: r for r in tr if r["method"] == "none"}
        for m in dict.fromkeys(r["method"] for r in tr):
            if m == "none" and len(dict.fromkeys(r["method"] for r in tr)) > 1:
                continue
            cells = []
            for b in budgets:
                r = next((r for r in tr if r["method"] == m and r["budget"] == b), None) or base.get(b)
                cells.append(f"{r['accuracy'] * 100:.1f}" if r else "")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ============================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    from vlmprune.eval.tasks import DEFAULT_TASKS, TASKS

    p = argparse.ArgumentParser(
        prog="vlmprune eval",
        description="Accuracy against visual tokens kept, for pruning methods x budgets, on the offline "
                    "tasks easyvqa and easyvqa-grid.",
        epilog="Runs offline (set HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 to be sure).",
    )
    p.add_argument("--methods", type=_csv_list, default=None,
                   help="comma-separated method names (default: every registered method except "
                        f"{', '.join(DEFAULT_EXCLUDED)})")
    p.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)),
                   help="comma-separated budgets: floats are fractions kept, ints tokens per image "
                        f"(default {','.join(map(str, DEFAULT_BUDGETS))})")
    p.add_argument("--tasks", type=_csv_list, default=list(DEFAULT_TASKS),
                   help=f"comma-separated, from {list(TASKS)} (default: %(default)s)")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                   help=f"questions per task: the first N of the task's seeded random order (default {DEFAULT_LIMIT})")
    p.add_argument("--batch-size", type=int, default=16, help="questions per forward (default 16)")
    p.add_argument("--out", type=Path, default=Path("vlmprune-eval"), help="output directory (default ./vlmprune-eval)")
    p.add_argument("--model", default=None,
                   help="checkpoint path or hub id of a LLaVA-family model (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto",
                   help="model dtype: auto (bfloat16 on CUDA and on CPUs with native bf16, else float32), "
                        "float32, bfloat16, ...")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a machine whose cores are busy with "
                        "other work, 1 avoids OpenMP oversubscription, which can be many times slower)")
    p.add_argument("--post-prompt", default=None,
                   help="text appended to each question (default: none for the embedded model, LLaVA's "
                        "short-answer instruction otherwise)")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--full-per-method", action="store_true",
                   help="run keep-all budgets under every method instead of once unwrapped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--update", action="store_true",
                   help="merge into the results already in --out (same tasks and --limit): rows of the methods "
                        "run now replace theirs, the others are kept")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from vlmprune.eval.tasks import TASKS, load_samples

    try:
        budgets = [_parse_budget(b) for b in _csv_list(args.budgets)]
    except argparse.ArgumentTypeError as e:
        raise SystemExit(f"vlmprune eval: --budgets: {e}")
    if not budgets:
        raise SystemExit("vlmprune eval: --budgets is empty")
    for t in args.tasks:
        if t not in TASKS:
            raise SystemExit(f"vlmprune eval: unknown task {t!r}; choose from {list(TASKS)}")
    if args.limit < 1 or args.batch_size < 1:
        raise SystemExit("vlmprune eval: --limit and --batch-size must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.device == "cpu" and hasattr(os, "getloadavg") and torch.get_num_threads() > 1:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load >= cores:
            log.warning("the CPUs are busy (load %.1f on %d cores): --threads 1 avoids OpenMP "
                        "oversubscription, which can make torch's %d threads several times slower",
                        load, cores, torch.get_num_threads())
    methods = args.methods if args.methods is not None else default_methods()
    validate_methods(methods)  # before the model loads: a bad name, option or weights= exits here

    t_start = time.perf_counter()
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    post_prompt = args.post_prompt
    if post_prompt is None:
        post_prompt = "" if is_embedded(args.model) else LLAVA_SHORT_ANSWER
    tasks = {t: load_samples(t, args.limit) for t in args.tasks}
    subset = {t: len(s) for t, s in tasks.items()}
    log.info(
        "vlmprune eval: %s on %s (a fixed seeded random subset: the first %d questions of each task's "
        "seeded order), methods %s, budgets %s, batch size %d",
        args.model or "the embedded model", ", ".join(f"{t} ({n} questions)" for t, n in subset.items()),
        args.limit, ",".join(methods), ",".join(map(str, budgets)), args.batch_size,
    )
    rows, skipped = run_benchmark(
        model, processor, tasks, methods, budgets, batch_size=args.batch_size, post_prompt=post_prompt,
        full_per_method=args.full_per_method, max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
    )
    total = time.perf_counter() - t_start

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    commands = []
    if args.update and (out / "results.json").exists():
        rows, skipped, commands = merge_results(out / "results.json", rows, skipped, subset)
    write_csv(rows, out / "results.csv")
    meta = {
        "model": args.model or "embedded",
        "tasks": subset,
        "subset": "first N questions of each task's committed index (eval/tasks/data/*.jsonl), which is "
                  "in a seeded random order: a fixed seeded random subset",
        "methods": methods,
        "skipped": skipped,
        "budgets": budgets,
        "batch_size": args.batch_size,
        "keep_all": "per method" if args.full_per_method else "once, unwrapped (method 'none')",
        "post_prompt": post_prompt,
        "metric": "exact match of the normalised one-word answer (lower case, punctuation removed)",
        "tokens_kept": "visual tokens per image, mean over questions and over the LLM's decoder layers "
                       "(= the budget for methods pruning before the LLM); tokens_final: after the last "
                       "pruning point; llm_input_tokens: entering the LLM",
        "total_wall_s": round(total, 1),
        "dtype": str(model.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "command": "vlmprune eval " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if commands:
        meta["earlier_commands"] = commands
        meta["methods"] = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    with open(out / "results.json", "w") as f:
        json.dump({"config": meta, "rows": rows}, f, indent=2)
        f.write("\n")
    title = f"{meta['model']}: " + ", ".join(f"{t} n={n}" for t, n in subset.items())
    plot(rows, out / "accuracy_vs_tokens.png", title=title)
    print(markdown_table(rows))
    for m, reason in skipped.items():
        print(f"skipped {m}: {reason}")
    print(f"wrote {out / 'results.csv'}, {out / 'results.json'}, {out / 'accuracy_vs_tokens.png'} "
          f"({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
