"""lmms-eval hooks of the offline tasks ``easyvqa`` and ``easyvqa-grid`` (see ``__init__.py``).

lmms-eval loads this file by path (``!function utils.<name>`` in the YAMLs), so it imports
everything it needs from the installed ``vlmprune.eval.tasks`` package.
"""

from __future__ import annotations

import math

from vlmprune.eval.tasks import exact_match, open_image, recorded_visual_tokens, task_of


def doc_to_visual(doc):
    return [open_image(doc["image"], task_of(doc["id"]))]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc, results):
    prediction = results[0] if results else ""
    return {
        "exact_match": float(exact_match(prediction, doc["answer"])),
        # visual tokens per image the vlmprune plugin kept for this question (None with other models)
        "visual_tokens": recorded_visual_tokens(doc["id"]),
    }


def mean_visual_tokens(items):
    """Mean visual tokens per image over the questions the vlmprune plugin answered (NaN if none)."""
    values = [float(v) for v in items if v is not None]
    return sum(values) / len(values) if values else math.nan
