"""easyvqa-scenes (vlmprune.eval.scenes): answers on hand-built scenes, the rendered pixels, balance,
determinism, registration as an offline task."""

from __future__ import annotations

import importlib.util
from collections import Counter

import numpy as np
import pytest

needs_easy_vqa = pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None,
                                    reason="easy-vqa not installed (pip install 'vlmprune[eval]')")

# (row, col) -> (image id, colour, shape); rows top to bottom, columns left to right
SCENE = {(0, 0): (1, "red", "circle"), (0, 3): (2, "red", "triangle"), (2, 1): (3, "blue", "circle"),
         (3, 3): (4, "green", "rectangle")}


@pytest.mark.parametrize("question, expected", [
    ("how many red shapes are there?", "two"),
    ("how many circles are there?", "two"),
    ("how many triangles are there?", "one"),
    ("how many yellow shapes are there?", "zero"),
    ("how many shapes are there?", "four"),
    ("is there a red circle?", "yes"),
    ("is there a blue triangle?", "no"),  # blue and triangle both present, on different objects
    ("is the red circle left of the red triangle?", "yes"),
    ("is the red triangle left of the red circle?", "no"),
    ("is the red triangle right of the blue circle?", "yes"),
    ("is the blue circle below the red circle?", "yes"),
    ("is the green rectangle above the blue circle?", "no"),
    ("what color is the shape in row three column two?", "blue"),
    ("what shape is in row four column four?", "rectangle"),
    ("what shape is in row one column four?", "triangle"),
])
def test_answers_on_a_hand_built_scene(question, expected):
    from vlmprune.eval.scenes import answer

    assert answer(SCENE, question) == expected


def test_bad_questions_are_refused():
    from vlmprune.eval.scenes import answer

    with pytest.raises(ValueError, match="same column"):  # (0, 3) and (3, 3)
        answer(SCENE, "is the red triangle left of the green rectangle?")
    with pytest.raises(ValueError, match="not an easyvqa-scenes question"):
        answer(SCENE, "what is the meaning of this?")
    with pytest.raises(ValueError, match="unknown colour"):
        answer(SCENE, "how many purple shapes are there?")


@needs_easy_vqa
def test_scenes_are_drawn_as_described_and_answered_from_them():
    """Every occupied cell shows its object (palette colour read off the pixels), empty cells are
    one plain colour, 3-7 objects with distinct (colour, shape), answers recomputed = stored."""
    from vlmprune.eval import easyvqa
    from vlmprune.eval.scenes import CELL, GRID, answer, scene_samples

    samples = scene_samples("test", n_images=16, questions_per_image=2, seed=0)
    attrs = easyvqa.attributes("test")
    for s in samples[::2]:
        assert 3 <= len(s.objects) <= 7
        assert len({o[1:] for o in s.objects.values()}) == len(s.objects)
        x = np.asarray(s.image)
        assert x.shape == (224, 224, 3)
        for r in range(GRID):
            for c in range(GRID):
                cell = s.image.crop((c * CELL, r * CELL, (c + 1) * CELL, (r + 1) * CELL))
                obj = s.objects.get((r, c))
                if obj is None:
                    assert len(np.unique(np.asarray(cell).reshape(-1, 3), axis=0)) == 1
                else:
                    assert attrs[obj[0]] == obj[1:]
                    assert easyvqa._pixel_color(cell) == obj[1]
    assert all(answer(s.objects, s.question) == s.answer for s in samples)


@needs_easy_vqa
def test_balance_and_determinism():
    from vlmprune.eval.scenes import KINDS, NUMBERS, scene_samples

    samples = scene_samples("test", n_images=160, questions_per_image=2, seed=0)
    assert len(samples) == 320 and len({s.id for s in samples}) == 320
    by_kind = {k: [s.answer for s in samples if s.kind == k] for k in KINDS}
    assert all(len(v) >= 40 for v in by_kind.values())
    for k in ("exists", "relation"):
        assert set(by_kind[k]) == {"yes", "no"} and 0.4 <= by_kind[k].count("yes") / len(by_kind[k]) <= 0.6
    assert set(by_kind["count"]) == set(NUMBERS)  # every count from zero to seven is asked
    majority = Counter(s.answer for s in samples).most_common(1)[0][1] / len(samples)
    assert majority < 0.3
    again = scene_samples("test", n_images=160, questions_per_image=2, seed=0)
    assert [(s.question, s.answer, s.objects) for s in again] == [(s.question, s.answer, s.objects) for s in samples]
    assert np.array_equal(np.asarray(again[-1].image), np.asarray(samples[-1].image))
    other = scene_samples("test", n_images=20, questions_per_image=2, seed=1)
    assert [s.question for s in other] != [s.question for s in samples[:40]]
    train = scene_samples("train", n_images=5, questions_per_image=1, seed=0)
    assert all(s.image_id.startswith("easyvqa-scenes-train-s0/") for s in train)


@needs_easy_vqa
def test_registered_as_an_offline_task():
    from vlmprune.eval import easyvqa
    from vlmprune.eval import tasks as T

    assert "easyvqa-scenes" in easyvqa.TASKS and "easyvqa-scenes" in T.TASKS
    assert T.task_of("easyvqa-scenes-test-s0/3.png") == "easyvqa-scenes"
    assert T.task_of("easyvqa-grid-test-s0/3/1") == "easyvqa-grid"
    assert T.task_of("easyvqa-test/7.png") == "easyvqa"
    assert (T.task_dir() / "easyvqa_scenes.yaml").read_text().count("task: easyvqa-scenes") == 1
    sub = easyvqa.load_task("easyvqa-scenes", "test", n=5, seed=0)
    assert len(sub) == 5 and all(s.image.size == (224, 224) for s in sub)
