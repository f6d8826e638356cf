"""Offline VQA tasks built from the ``easy-vqa`` package (PyPI ``easy-vqa==1.0``, MIT).

Two tasks, both with easy-VQA's 13-word answer vocabulary (:data:`ANSWERS`):

``easyvqa``
    easy-VQA as shipped: one 64x64 image with a single coloured shape, a question
    ("what color is the shape?", "is there a triangle?", ...), a one-word answer.
    Test split: 1,000 images, 9,673 questions.

``easyvqa-grid``
    2x2 mosaics of four easy-VQA images of one split, each resized (bilinear) to 112 px and
    pasted into one 224x224 image, so each quadrant covers 8x8 = 64 of the 256 patch tokens of a
    ViT-S/14 at 224 px. Questions name one quadrant ("what color is the shape in the top left?",
    "what shape is in the bottom right?", "is there a red shape in the top right?"). Answering
    needs the tokens of that quadrant, so methods that drop whole regions lose accuracy.
    Mosaics and questions are generated deterministically from a seed (:func:`grid_samples`).

Every sample is a :class:`Sample` (``id``, PIL ``image``, ``question``, ``answer``,
``image_id``); samples sharing an ``image_id`` share the same image object.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

__all__ = [
    "ANSWERS",
    "COLORS",
    "QUADRANTS",
    "SHAPES",
    "TASKS",
    "Sample",
    "attributes",
    "easyvqa_samples",
    "grid_samples",
    "load_image",
    "load_task",
    "mosaic",
    "vocabulary",
]

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
ANSWERS = ("yes", "no") + SHAPES + COLORS
#: quadrant name -> (row, col) in the 2x2 mosaic
QUADRANTS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
TASKS = ("easyvqa", "easyvqa-grid")
GRID_SIZE = 224
TILE_SIZE = GRID_SIZE // 2

#: default test subsets (seeded): the grid task uses 500 mosaics x 2 questions
DEFAULT_GRID_TEST = dict(n_images=500, questions_per_image=2, seed=0)

_COLOR_TEMPLATES = (
    "what color is the shape in the {q}?",
    "what is the color of the shape in the {q}?",
    "what color is the shape in the {q} of the image?",
)
_SHAPE_TEMPLATES = (
    "what shape is in the {q}?",
    "what shape is in the {q} of the image?",
    "what is the shape in the {q}?",
)
_YESNO_COLOR_TEMPLATES = (
    "is there a {x} shape in the {q}?",
    "does the {q} contain a {x} shape?",
)
_YESNO_SHAPE_TEMPLATES = (
    "is there a {x} in the {q}?",
    "does the {q} contain a {x}?",
)


@dataclass
class Sample:
    id: str
    image: Image.Image
    question: str
    answer: str
    image_id: str
    #: easyvqa-grid only: the easy-VQA image ids of the four tiles (TL, TR, BL, BR) and the
    #: quadrant the question is about
    tiles: tuple[int, int, int, int] | None = None
    quadrant: str | None = None


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


@lru_cache(maxsize=2)
def _questions(split: str):
    import easy_vqa

    fn = easy_vqa.get_train_questions if _check_split(split) == "train" else easy_vqa.get_test_questions
    q, a, ids = fn()
    return tuple(q), tuple(a), tuple(int(i) for i in ids)


@lru_cache(maxsize=2)
def _image_paths(split: str) -> dict:
    import easy_vqa

    fn = easy_vqa.get_train_image_paths if _check_split(split) == "train" else easy_vqa.get_test_image_paths
    return {int(k): v for k, v in fn().items()}


@lru_cache(maxsize=10000)
def load_image(split: str, image_id: int) -> Image.Image:
    """An easy-VQA image (64x64 RGB, PIL), loaded once."""
    with Image.open(_image_paths(split)[int(image_id)]) as im:
        return im.convert("RGB")


#: easy-VQA's palette (RGB), used to read a shape's colour off its pixels when no question says it
PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
           "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42),
           "yellow": (255, 255, 0)}


def _pixel_color(img: Image.Image) -> str:
    import numpy as np

    x = np.asarray(img, dtype=np.int32)
    counts = {c: int((np.abs(x - np.array(v)).sum(-1) < 60).sum()) for c, v in PALETTE.items()}
    return max(counts, key=counts.get)


@lru_cache(maxsize=2)
def attributes(split: str) -> dict[int, tuple[str, str]]:
    """``image id -> (color, shape)`` of the one shape in each easy-VQA image of a split.

    Read off the image's question-answer pairs (direct answers, then elimination: "is there not
    a circle? yes" rules a circle out). When no question settles the colour, it is read from the
    pixels (the nearest palette colour; this agrees with every question-derived colour of both
    splits). The ~4 % of images whose shape no question settles are left out, so the mosaics
    only use images whose ground truth is certain."""
    colors: dict[int, str] = {}
    shapes: dict[int, str] = {}
    not_color: dict[int, set] = {}
    not_shape: dict[int, set] = {}
    for q, a, i in zip(*_questions(split)):
        words = re.findall(r"[a-z]+", q.lower())
        cw = [w for w in words if w in COLORS]
        sw = [w for w in words if w in SHAPES]
        if a in COLORS:
            colors[i] = a
            if sw:  # "what color is the circle?"
                shapes[i] = sw[0]
        elif a in SHAPES:
            shapes[i] = a
            if cw:  # "what is the red shape?"
                colors[i] = cw[0]
        else:
            positive = (a == "yes") != bool({"not", "no"} & set(words))
            for w in cw:
                if positive:
                    colors[i] = w
                else:
                    not_color.setdefault(i, set()).add(w)
            for w in sw:
                if positive:
                    shapes[i] = w
                else:
                    not_shape.setdefault(i, set()).add(w)
    out = {}
    for i in sorted(_image_paths(split)):
        if i not in shapes:
            left = set(SHAPES) - not_shape.get(i, set())
            if len(left) != 1:
                continue
            shapes[i] = left.pop()
        if i not in colors:
            left = set(COLORS) - not_color.get(i, set())
            colors[i] = left.pop() if len(left) == 1 else _pixel_color(load_image(split, i))
        out[i] = (colors[i], shapes[i])
    return out


def vocabulary() -> list[str]:
    """Every word used by both tasks' questions and answers, plus the prompt's ``answer``/``:``."""
    words = set(ANSWERS) | {"answer", ":", "?"}
    for split in ("train", "test"):
        for q in _questions(split)[0]:
            words.update(re.findall(r"\w+|[^\w\s]", q.lower()))
    for t in _COLOR_TEMPLATES + _SHAPE_TEMPLATES + _YESNO_COLOR_TEMPLATES + _YESNO_SHAPE_TEMPLATES:
        for q in QUADRANTS:
            words.update(re.findall(r"\w+|[^\w\s]", t.format(q=q, x="red").lower()))
    words.update(COLORS + SHAPES)
    return sorted(words)


def easyvqa_samples(split: str = "test", n: int | None = None, seed: int = 0) -> list[Sample]:
    """Plain easy-VQA. ``n=None``: every question of the split in its shipped order; otherwise a
    seeded random subset of ``n`` questions (same ``n`` and ``seed`` -> same subset)."""
    qs, ans, ids = _questions(split)
    idx = list(range(len(qs)))
    if n is not None:
        if not 0 < n <= len(idx):
            raise ValueError(f"n must be in [1, {len(idx)}] for the {split} split, got {n}")
        idx = sorted(random.Random(seed).sample(idx, n))
    return [
        Sample(id=f"easyvqa-{split}-{k}", image=load_image(split, ids[k]), question=qs[k],
               answer=ans[k], image_id=f"easyvqa-{split}/{ids[k]}")
        for k in idx
    ]


def mosaic(split: str, image_ids) -> Image.Image:
    """The 224x224 2x2 mosaic of four easy-VQA images (row-major: TL, TR, BL, BR), 112 px each."""
    image_ids = list(image_ids)
    if len(image_ids) != 4:
        raise ValueError(f"a mosaic takes 4 image ids, got {len(image_ids)}")
    canvas = Image.new("RGB", (GRID_SIZE, GRID_SIZE), (255, 255, 255))
    for k, i in enumerate(image_ids):
        tile = load_image(split, i).resize((TILE_SIZE, TILE_SIZE), Image.BILINEAR)
        r, c = divmod(k, 2)
        canvas.paste(tile, (c * TILE_SIZE, r * TILE_SIZE))
    return canvas


def _grid_question(rng: random.Random, kind: str, quad: str, target, others) -> tuple[str, str]:
    color, shape = target
    if kind == "color":
        return rng.choice(_COLOR_TEMPLATES).format(q=quad), color
    if kind == "shape":
        return rng.choice(_SHAPE_TEMPLATES).format(q=quad), shape
    # yes/no about a color or a shape; "no" answers prefer a value present in another quadrant
    about_color = rng.random() < 0.5
    truth, pool = (color, COLORS) if about_color else (shape, SHAPES)
    templates = _YESNO_COLOR_TEMPLATES if about_color else _YESNO_SHAPE_TEMPLATES
    if rng.random() < 0.5:
        x, ans = truth, "yes"
    else:
        elsewhere = sorted({(o[0] if about_color else o[1]) for o in others} - {truth})
        x = rng.choice(elsewhere) if elsewhere and rng.random() < 0.7 else rng.choice(
            [v for v in pool if v != truth])
        ans = "no"
    return rng.choice(templates).format(q=quad, x=x), ans


def grid_samples(split: str = "test", n_images: int = 500, questions_per_image: int = 2,
                 seed: int = 0, kinds=("color", "color", "shape", "shape", "yesno")) -> list[Sample]:
    """``easyvqa-grid``: ``n_images`` seeded 2x2 mosaics of four distinct ``split`` images, each with
    ``questions_per_image`` questions about distinct quadrants (quadrants repeat only beyond 4).
    A question's kind is drawn from ``kinds`` (default: 40 % color, 40 % shape, 20 % yes/no).
    Deterministic: the same arguments give the same mosaics, questions and answers."""
    attrs = attributes(split)
    pool = sorted(attrs)
    rng = random.Random(f"easyvqa-grid/{split}/{seed}")
    names = list(QUADRANTS)
    out = []
    for m in range(n_images):
        ids = rng.sample(pool, 4)
        img = mosaic(split, ids)
        image_id = f"easyvqa-grid-{split}-s{seed}/{m}"
        quads = []
        while len(quads) < questions_per_image:
            quads += rng.sample(names, 4)
        for j, quad in enumerate(quads[:questions_per_image]):
            k = names.index(quad)
            others = [attrs[i] for t, i in enumerate(ids) if t != k]
            q, a = _grid_question(rng, rng.choice(kinds), quad, attrs[ids[k]], others)
            out.append(Sample(id=f"{image_id}/{j}", image=img, question=q, answer=a, image_id=image_id,
                              tiles=tuple(ids), quadrant=quad))
    return out


def load_task(task: str, split: str = "test", n: int | None = None, seed: int = 0) -> list[Sample]:
    """One of :data:`TASKS`. For ``easyvqa-grid`` on the test split the default is
    :data:`DEFAULT_GRID_TEST` (1,000 questions); ``n`` then takes a seeded subset of questions."""
    if task == "easyvqa":
        return easyvqa_samples(split, n=n, seed=seed)
    if task == "easyvqa-grid":
        samples = grid_samples(split, **DEFAULT_GRID_TEST) if split == "test" else grid_samples(split, seed=seed)
        if n is not None:
            if not 0 < n <= len(samples):
                raise ValueError(f"n must be in [1, {len(samples)}], got {n}")
            keep = sorted(random.Random(seed).sample(range(len(samples)), n))
            samples = [samples[k] for k in keep]
        return samples
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
