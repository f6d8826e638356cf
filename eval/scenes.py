"""``easyvqa-scenes``: 4x4 scenes of easy-VQA shapes whose questions need several regions at once.

Each scene is a 224x224 image cut into a 4x4 grid of 56 px cells (each cell = 4x4 = 16 of the
256 patch tokens of a ViT-S/14 at 224 px). Between :data:`MIN_OBJECTS` and :data:`MAX_OBJECTS`
cells hold one easy-VQA image of the split (resized bilinearly from 64 to 56 px); the others are
filled with the plain background colour of another image of the split, so an empty cell looks
like an easy-VQA image without its shape. No two objects of a scene share both colour and shape,
so "the red circle" names one object. Question kinds (:data:`KINDS`):

``count``
    "how many red shapes are there?", "how many circles are there?", "how many shapes are
    there?" (answers ``zero`` .. ``seven``: every cell must be looked at).
``exists``
    "is there a red circle?" (colour and shape bound to one object; half the "no" answers name a
    colour and a shape that are both in the scene, on different objects).
``relation``
    "is the red circle left of the blue triangle?" (``left of``, ``right of``, ``above``,
    ``below``; two objects in different columns, resp. rows, so the answer is never ambiguous).
``cell``
    "what color is the shape in row two column three?", "what shape is in row one column four?"
    (one named cell, as easyvqa-grid's quadrant questions).

Answers are computed from the scene by :func:`answer` (the single source of truth) and drawn to
be balanced within a kind: yes/no half each, counts roughly uniform over the values the scene
offers. Train scenes use easy-VQA's train images, test scenes its test images; everything is
seeded (:func:`scene_samples`). The answer words are :data:`ANSWERS` (easy-VQA's 13 plus the
number words).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image

from . import easyvqa

__all__ = [
    "ANSWERS",
    "DEFAULT_TEST",
    "GRID",
    "KINDS",
    "NUMBERS",
    "SceneSample",
    "answer",
    "render",
    "scene_samples",
    "vocabulary",
]

GRID = 4
SIZE = easyvqa.GRID_SIZE
CELL = SIZE // GRID
MIN_OBJECTS, MAX_OBJECTS = 3, 7
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven")
ANSWERS = easyvqa.ANSWERS + NUMBERS
KINDS = ("count", "exists", "relation", "cell")
#: question-kind mixture of :func:`scene_samples` (weights of :data:`KINDS`)
DEFAULT_WEIGHTS = (3, 2, 3, 2)
#: the committed test set: 500 scenes x 2 questions
DEFAULT_TEST = {"n_images": 500, "questions_per_image": 2, "seed": 0}
RELATIONS = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}
_PLURAL = {s: s + "s" for s in easyvqa.SHAPES}


@dataclass
class SceneSample(easyvqa.Sample):
    #: the scene: (row, col) -> (easy-VQA image id, colour, shape), for occupied cells only
    objects: dict | None = None
    kind: str | None = None


def _number(k: int) -> str:
    return NUMBERS[k]


def render(split: str, objects: dict, backgrounds) -> Image.Image:
    """The 224x224 scene: ``objects`` maps ``(row, col)`` to an easy-VQA image id of ``split``
    (or a tuple whose first item is one); the empty cells take the colours of ``backgrounds``
    (RGB triples, used in raster order of the empty cells)."""
    canvas = Image.new("RGB", (SIZE, SIZE))
    fill = iter(backgrounds)
    for r in range(GRID):
        for c in range(GRID):
            obj = objects.get((r, c))
            if obj is None:
                tile = Image.new("RGB", (CELL, CELL), tuple(next(fill)))
            else:
                i = obj[0] if isinstance(obj, tuple) else obj
                tile = easyvqa.load_image(split, i).resize((CELL, CELL), Image.BILINEAR)
            canvas.paste(tile, (c * CELL, r * CELL))
    return canvas


def _find(objects: dict, color: str | None, shape: str | None) -> list:
    return [rc for rc, (_, col, sh) in sorted(objects.items())
            if (color is None or col == color) and (shape is None or sh == shape)]


_COUNT = re.compile(r"how many (?:shapes|(\w+) shapes|(\w+)s) are there\?")
_EXISTS = re.compile(r"is there an? (\w+) (\w+)\?")
_RELATION = re.compile(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?")
_CELL = re.compile(r"what (color is the shape|shape is) in row (\w+) column (\w+)\?")


def answer(objects: dict, question: str) -> str:
    """The answer to a scene question from the scene itself. ``objects``: ``(row, col) ->
    (image id, colour, shape)`` (rows top to bottom, columns left to right, 0-based)."""
    q = question.strip().lower()
    if m := _COUNT.fullmatch(q):
        color, shape = m.group(1), m.group(2)
        if color is not None and color not in easyvqa.COLORS:
            raise ValueError(f"unknown colour {color!r} in {question!r}")
        if shape is not None and shape not in easyvqa.SHAPES:
            raise ValueError(f"unknown shape {shape!r}s in {question!r}")
        return _number(len(_find(objects, color, shape)))
    if m := _EXISTS.fullmatch(q):
        return "yes" if _find(objects, m.group(1), m.group(2)) else "no"
    if m := _RELATION.fullmatch(q):
        (a,), (b,) = _find(objects, m.group(1), m.group(2)), _find(objects, m.group(4), m.group(5))
        axis, sign = RELATIONS[m.group(3)]
        if a[axis] == b[axis]:
            raise ValueError(f"{question!r} is ambiguous: both objects are in the same {('row', 'column')[axis]}")
        return "yes" if (a[axis] - b[axis]) * sign > 0 else "no"
    if m := _CELL.fullmatch(q):
        obj = objects[(NUMBERS.index(m.group(2)) - 1, NUMBERS.index(m.group(3)) - 1)]
        return obj[2] if m.group(1) == "shape is" else obj[1]
    raise ValueError(f"not an easyvqa-scenes question: {question!r}")


def _count_question(rng: random.Random, objects: dict) -> str:
    about = rng.choice(("color", "shape", "all"))
    if about == "all":
        return "how many shapes are there?"
    values = easyvqa.COLORS if about == "color" else easyvqa.SHAPES
    counts = {v: len(_find(objects, v, None) if about == "color" else _find(objects, None, v)) for v in values}
    target = rng.choice(sorted(set(counts.values())))  # uniform over the counts this scene offers
    v = rng.choice([v for v in values if counts[v] == target])
    return f"how many {v} shapes are there?" if about == "color" else f"how many {_PLURAL[v]} are there?"


def _exists_question(rng: random.Random, objects: dict) -> str:
    present = sorted({(o[1], o[2]) for o in objects.values()})
    if rng.random() < 0.5:
        color, shape = rng.choice(present)
    else:
        colors, shapes = sorted({c for c, _ in present}), sorted({s for _, s in present})
        hard = [(c, s) for c in colors for s in shapes if (c, s) not in present]
        absent = [(c, s) for c in easyvqa.COLORS for s in easyvqa.SHAPES if (c, s) not in present]
        color, shape = rng.choice(hard) if hard and rng.random() < 0.5 else rng.choice(absent)
    return f"is there a {color} {shape}?"


def _relation_question(rng: random.Random, objects: dict) -> str:
    a, b = rng.sample(sorted(objects), 2)
    axis = rng.choice([k for k in (0, 1) if a[k] != b[k]])  # distinct cells differ in row or column
    truth = next(name for name, (ax, sign) in RELATIONS.items() if ax == axis and (a[axis] - b[axis]) * sign > 0)
    false = next(name for name, (ax, _) in RELATIONS.items() if ax == axis and name != truth)
    rel = truth if rng.random() < 0.5 else false
    (_, c1, s1), (_, c2, s2) = objects[a], objects[b]
    return f"is the {c1} {s1} {rel} the {c2} {s2}?"


def _cell_question(rng: random.Random, objects: dict) -> str:
    r, c = rng.choice(sorted(objects))
    where = f"row {_number(r + 1)} column {_number(c + 1)}"
    return f"what color is the shape in {where}?" if rng.random() < 0.5 else f"what shape is in {where}?"


_MAKERS = {"count": _count_question, "exists": _exists_question, "relation": _relation_question,
           "cell": _cell_question}


def _draw_scene(rng: random.Random, split: str, attrs: dict, pool: list, by_bg: list) -> tuple[dict, list]:
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    objects, used = {}, set()
    for rc in cells:
        while True:
            i = rng.choice(pool)
            if attrs[i] not in used:
                break
        used.add(attrs[i])
        objects[rc] = (i, *attrs[i])
    backgrounds = [by_bg[rng.randrange(len(by_bg))] for _ in range(GRID * GRID - n)]
    return objects, backgrounds


def _background(split: str, image_id: int) -> tuple[int, int, int]:
    return easyvqa.load_image(split, image_id).getpixel((0, 0))


def scene_samples(split: str = "test", n_images: int = 500, questions_per_image: int = 2, seed: int = 0,
                  weights=DEFAULT_WEIGHTS) -> list[SceneSample]:
    """``n_images`` seeded scenes of ``split``'s easy-VQA images, ``questions_per_image`` questions
    each (distinct questions; kinds drawn with ``weights`` over :data:`KINDS`). Deterministic."""
    if len(weights) != len(KINDS):
        raise ValueError(f"weights must give one weight per kind {KINDS}, got {weights!r}")
    attrs = easyvqa.attributes(split)
    pool = sorted(attrs)
    rng = random.Random(f"easyvqa-scenes/{split}/{seed}")
    bg_ids = rng.sample(pool, min(200, len(pool)))
    by_bg = [_background(split, i) for i in bg_ids]
    out = []
    for m in range(n_images):
        objects, backgrounds = _draw_scene(rng, split, attrs, pool, by_bg)
        img = render(split, objects, backgrounds)
        image_id = f"easyvqa-scenes-{split}-s{seed}/{m}"
        asked = set()
        for j in range(questions_per_image):
            for _ in range(100):
                kind = rng.choices(KINDS, weights=weights)[0]
                q = _MAKERS[kind](rng, objects)
                if q not in asked:
                    break
            asked.add(q)
            out.append(SceneSample(id=f"{image_id}/{j}", image=img, question=q, answer=answer(objects, q),
                                   image_id=image_id, objects=objects, kind=kind))
    return out


def vocabulary() -> list[str]:
    """The words of every question template and answer (for a word-level tokenizer)."""
    words = set(ANSWERS) | set(_PLURAL.values()) | {"?"}
    for t in ("how many shapes are there", "is there a", "is the left of right above below",
              "what color is the shape in row column", "what shape is in"):
        words.update(t.split())
    return sorted(words)
