"""The two offline VQA tasks as local data: one question index per task, images in a cache.

Tasks (built from :mod:`vlmprune.eval.easyvqa`, which holds the generators):

``easyvqa``
    easy-VQA's test split (one shape per 64x64 image).
``easyvqa-grid``
    2x2 mosaics of four easy-VQA test images (224 px), questions about one named quadrant.
``easyvqa-scenes``
    4x4 scenes of 3-7 easy-VQA test shapes (224 px): counting, relations, existence, one cell
    (:mod:`vlmprune.eval.scenes`).

Layout:

* ``eval/tasks/data/<task>.jsonl`` (committed, small): the fixed question index of each task, in
  a seeded random order, so that *any prefix* of it is itself a seeded random subset. One row per
  question: ``id``, ``question``, ``answer``, ``image`` (a PNG path relative to the image cache)
  and ``image_id``. ``data/<task>.meta.json`` records how the index was drawn.
* The images are **not** committed: they are written as lossless PNGs to
  ``$VLMPRUNE_CACHE/tasks/`` (default ``~/.cache/vlmprune/tasks/``) by
  ``python -m vlmprune.eval.tasks.build`` or, lazily, on first use by :func:`ensure_images`.
  Regeneration checks that the generator still produces the committed questions and answers
  (and fails loudly when it has drifted).
* ``eval/tasks/easyvqa.yaml`` and ``eval/tasks/easyvqa_grid.yaml`` are lmms-eval task configs
  (``dataset_path: json`` over the index; use them with ``--include_path``); their hooks are in
  ``eval/tasks/utils.py``.

Metric: exact match of the normalised one-word answer (:func:`normalize_answer`: lower case,
punctuation removed, whitespace collapsed).
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

__all__ = [
    "DEFAULT_INDEX",
    "DEFAULT_TASKS",
    "TASKS",
    "ensure_images",
    "exact_match",
    "image_cache_dir",
    "index_path",
    "load_index",
    "load_samples",
    "normalize_answer",
    "task_dir",
    "task_of",
]

#: task name -> file stem of its index under data/ and its lmms-eval YAML
TASKS = {"easyvqa": "easyvqa", "easyvqa-grid": "easyvqa_grid", "easyvqa-scenes": "easyvqa_scenes"}
#: what ``vlmprune eval`` runs when no ``--tasks`` is given (the tasks of the committed benchmark)
DEFAULT_TASKS = ("easyvqa", "easyvqa-grid")

#: how each committed index is drawn from :func:`vlmprune.eval.easyvqa.load_task` (test split):
#: ``n`` questions (``None``: the task's whole default test set), ``seed`` for the subset,
#: ``order_seed`` for the shuffle that makes every prefix a seeded random subset.
DEFAULT_INDEX = {
    "easyvqa": dict(split="test", n=1000, seed=0, order_seed=0),
    "easyvqa-grid": dict(split="test", n=None, seed=0, order_seed=0),
    "easyvqa-scenes": dict(split="test", n=None, seed=0, order_seed=0),
}


def task_dir() -> Path:
    """The directory holding the task YAMLs (pass it to lmms-eval's ``--include_path``)."""
    return Path(__file__).resolve().parent


def index_path(task: str) -> Path:
    return task_dir() / "data" / f"{_stem(task)}.jsonl"


def image_cache_dir() -> Path:
    """``$VLMPRUNE_CACHE/tasks`` or ``~/.cache/vlmprune/tasks`` (where task images are written)."""
    env = os.environ.get("VLMPRUNE_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "vlmprune"
    return root / "tasks"


def _stem(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    return TASKS[task]


def task_of(name: str) -> str:
    """The task an image path or question id belongs to (``easyvqa-grid-test-s0/3.png`` ->
    ``easyvqa-grid``)."""
    return next((t for t in sorted(TASKS, key=len, reverse=True) if str(name).startswith(t + "-")), "easyvqa")


_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text) -> str:
    """Lower case, punctuation removed, whitespace collapsed (``" Red."`` -> ``"red"``)."""
    return " ".join(_PUNCT.sub(" ", str(text).lower()).split())


def exact_match(prediction, answer) -> bool:
    """The metric of both tasks: normalised prediction equals the normalised one-word answer."""
    return normalize_answer(prediction) == normalize_answer(answer)


# ----------------------------------------------------------------------------- the index


def _rows_from_samples(samples) -> list[dict]:
    return [
        {"id": s.id, "question": s.question, "answer": s.answer, "image": s.image_id + ".png",
         "image_id": s.image_id}
        for s in samples
    ]


def generate_index(task: str) -> tuple[list[dict], dict, dict]:
    """Draw the task's index from the generator: ``(rows, meta, images)`` where ``images`` maps
    each row's relative ``image`` path to its PIL image."""
    from vlmprune.eval import easyvqa

    spec = DEFAULT_INDEX[task]
    samples = easyvqa.load_task(task, split=spec["split"], n=spec["n"], seed=spec["seed"])
    samples = list(samples)
    random.Random(f"{task}/order/{spec['order_seed']}").shuffle(samples)
    rows = _rows_from_samples(samples)
    images = {r["image"]: s.image for r, s in zip(rows, samples)}
    meta = {
        "task": task,
        "generator": f"vlmprune.eval.easyvqa.load_task({task!r}, split={spec['split']!r}, "
                     f"n={spec['n']!r}, seed={spec['seed']!r}), shuffled with "
                     f"random.Random('{task}/order/{spec['order_seed']}')",
        **spec,
        "questions": len(rows),
        "images": len(images),
        "answers": sorted({r["answer"] for r in rows}),
    }
    return rows, meta, images


def write_index(task: str, rows: list[dict], meta: dict) -> Path:
    path = index_path(task)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    with open(path.with_suffix(".meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return path


def load_index(task: str, limit: int | None = None) -> list[dict]:
    """The committed question rows of ``task`` (the first ``limit`` of them: a seeded subset)."""
    path = index_path(task)
    if not path.exists():
        raise FileNotFoundError(f"no index for task {task!r} at {path}; run `python -m vlmprune.eval.tasks.build --index`")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        rows = rows[:limit]
    return rows


# ----------------------------------------------------------------------------- the images


def _save_png(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def ensure_images(task: str, rows: list[dict] | None = None, cache: Path | None = None,
                  progress: bool = False) -> int:
    """Write the PNGs of ``rows`` (default: the whole index) that are missing from the cache.

    Regenerates the task from its generator and checks it still yields the committed questions
    and answers. Returns how many images were written (0 when all exist)."""
    cache = Path(cache) if cache is not None else image_cache_dir()
    rows = load_index(task) if rows is None else rows
    missing = {r["image"] for r in rows if not (cache / r["image"]).exists()}
    if not missing:
        return 0
    generated, _, images = generate_index(task)
    by_id = {r["id"]: r for r in generated}
    for r in rows:
        g = by_id.get(r["id"])
        if g is None or (g["question"], g["answer"], g["image"]) != (r["question"], r["answer"], r["image"]):
            raise RuntimeError(
                f"the {task!r} generator (vlmprune.eval.easyvqa) no longer produces the committed index "
                f"{index_path(task)} (first difference at id {r['id']!r}); rebuild the index with "
                "`python -m vlmprune.eval.tasks.build --index` and commit it"
            )
    todo = sorted(missing)
    if progress:
        from tqdm import tqdm

        todo = tqdm(todo, desc=f"{task} images", unit="img")
    for rel in todo:
        _save_png(images[rel], cache / rel)
    return len(missing)


def open_image(rel: str, task: str | None = None, cache: Path | None = None):
    """The PIL image at ``rel`` in the cache (building the task's images first if missing)."""
    from PIL import Image

    cache = Path(cache) if cache is not None else image_cache_dir()
    path = cache / rel
    if not path.exists():
        if task is None:
            task = task_of(rel)
        ensure_images(task, cache=cache)
    with Image.open(path) as im:
        return im.convert("RGB")


def load_samples(task: str, limit: int | None = None, cache: Path | None = None) -> list[dict]:
    """Index rows of ``task`` (first ``limit``) with their PIL ``image`` loaded (shared per file)."""
    rows = load_index(task, limit)
    ensure_images(task, rows, cache=cache)
    images: dict = {}
    out = []
    for r in rows:
        if r["image"] not in images:
            images[r["image"]] = open_image(r["image"], task, cache=cache)
        out.append({**r, "image": images[r["image"]], "image_file": r["image"]})
    return out


# ----------------------------------------------------------------------------- visual-token side channel

#: question id -> visual tokens per image the model kept for it (filled by the vlmprune lmms-eval
#: plugin, read by the tasks' ``process_results`` so that lmms-eval reports a ``visual_tokens``
#: metric next to ``exact_match``)
_VISUAL_TOKENS: dict[str, float] = {}


def record_visual_tokens(question_id: str, tokens: float) -> None:
    _VISUAL_TOKENS[str(question_id)] = float(tokens)


def recorded_visual_tokens(question_id: str) -> float | None:
    return _VISUAL_TOKENS.get(str(question_id))
