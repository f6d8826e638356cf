"""``easyvqa-retrieval``: text-to-page retrieval over 2x2 easy-VQA mosaics.

Documents are seeded 224 px mosaics of four distinct images of a split
(:func:`vlmprune.eval.easyvqa.mosaic`). Each test document has one relevant query, a templated
description of two of its quadrants ("red circle in the top left and blue triangle in the bottom
right", :data:`TEMPLATES`), chosen so that no other document of the collection matches it. A single
(colour, shape, quadrant) cannot be unique in a collection of a few hundred pages (there are only
8 x 3 x 4 = 96 of them, each held by about 4 n / 96 pages), so a query names two. Hard negatives
of a query are the other pages holding, in one of its two quadrants, a shape of the same colour or
the same shape (:attr:`Query.hard_negatives`); those matching one of its clauses exactly are
:attr:`Query.half_matches`. The train split gives the training pages (:func:`mosaics`) and their
random descriptions (:func:`describe`).

Metrics with one relevant page per query: Recall@1, nDCG@k = ``1 / log2(rank + 2)`` when the
relevant page ranks ``rank < k`` (0-based), else 0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from vlmprune.eval import easyvqa

TASK = "easyvqa-retrieval"
#: the test collection (seeded): 300 pages, one query each
DEFAULT_TEST = {"n": 300, "seed": 0}
QUADRANTS = tuple(easyvqa.QUADRANTS)
TEMPLATES = (
    "{c1} {s1} in the {q1} and {c2} {s2} in the {q2}",
    "a {c1} {s1} in the {q1} and a {c2} {s2} in the {q2}",
    "the {q1} has a {c1} {s1} , the {q2} has a {c2} {s2}",
)


@dataclass(frozen=True)
class Page:
    """A mosaic: easy-VQA image ids (TL, TR, BL, BR) and their (colour, shape)."""

    split: str
    tiles: tuple[int, int, int, int]
    attrs: tuple[tuple[str, str], ...]

    def image(self):
        return easyvqa.mosaic(self.split, self.tiles)


@dataclass
class Query:
    text: str
    #: the relevant page's index in the collection
    page: int
    #: ((quadrant index, colour, shape), (quadrant index, colour, shape))
    clauses: tuple
    hard_negatives: list[int] = field(default_factory=list)
    half_matches: list[int] = field(default_factory=list)


def mosaics(split: str, n: int, seed: int = 0) -> list[Page]:
    """``n`` seeded mosaics of four distinct images of ``split`` (images whose attributes are
    certain, :func:`vlmprune.eval.easyvqa.attributes`)."""
    attrs = easyvqa.attributes(split)
    pool = sorted(attrs)
    rng = random.Random(f"{TASK}/{split}/{seed}")
    return [_page(split, rng.sample(pool, 4), attrs) for _ in range(n)]


def _page(split, ids, attrs) -> Page:
    return Page(split, tuple(ids), tuple(attrs[i] for i in ids))


def matches(page: Page, clauses) -> bool:
    return all(page.attrs[q] == (c, s) for q, c, s in clauses)


def render(clauses, template: str) -> str:
    (q1, c1, s1), (q2, c2, s2) = clauses
    return template.format(q1=QUADRANTS[q1], c1=c1, s1=s1, q2=QUADRANTS[q2], c2=c2, s2=s2)


def describe(page: Page, rng: random.Random) -> tuple[str, tuple]:
    """A random two-quadrant description of ``page``: ``(text, clauses)``."""
    q1, q2 = sorted(rng.sample(range(4), 2))
    clauses = ((q1, *page.attrs[q1]), (q2, *page.attrs[q2]))
    return render(clauses, rng.choice(TEMPLATES)), clauses


def collection(split: str = "test", n: int = DEFAULT_TEST["n"], seed: int = DEFAULT_TEST["seed"]):
    """``(pages, queries)``: ``n`` seeded mosaics of ``split`` and one query per page whose two
    clauses no other page satisfies (a page with no such pair of quadrants is redrawn). Each
    query's pair of quadrants and template are drawn from the seed; deterministic."""
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"parameter 'n' must be an int >= 2 (pages in the collection), got {n!r}")
    attrs = easyvqa.attributes(split)
    pool = sorted(attrs)
    rng = random.Random(f"{TASK}/collection/{split}/{seed}")
    pages = [_page(split, rng.sample(pool, 4), attrs) for _ in range(n)]
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    while True:
        chosen = []
        for i, page in enumerate(pages):
            order = rng.sample(pairs, len(pairs))
            unique = [p for p in order if not any(
                matches(o, [(q, *page.attrs[q]) for q in p]) for j, o in enumerate(pages) if j != i)]
            chosen.append(unique[0] if unique else None)
        redraw = [i for i, c in enumerate(chosen) if c is None]
        if not redraw:
            break
        for i in redraw:
            pages[i] = _page(split, rng.sample(pool, 4), attrs)
    queries = []
    for i, (page, (a, b)) in enumerate(zip(pages, chosen)):
        clauses = ((a, *page.attrs[a]), (b, *page.attrs[b]))
        q = Query(render(clauses, rng.choice(TEMPLATES)), i, clauses)
        for j, other in enumerate(pages):
            if j == i:
                continue
            if any(other.attrs[qd][0] == c or other.attrs[qd][1] == s for qd, c, s in clauses):
                q.hard_negatives.append(j)
            if any(other.attrs[qd] == (c, s) for qd, c, s in clauses):
                q.half_matches.append(j)
        queries.append(q)
    return pages, queries


def ranks(scores: torch.Tensor, relevant) -> torch.Tensor:
    """0-based rank of each query's relevant page in ``scores [Q, N]`` (ties count against it)."""
    relevant = torch.as_tensor(relevant)
    own = scores.gather(1, relevant[:, None])
    return (scores >= own).sum(1) - 1


def metrics(scores: torch.Tensor, relevant) -> dict:
    """Recall@1, nDCG@5 and nDCG@10 (means over queries, one relevant page each)."""
    r = ranks(scores, relevant).double()
    gain = 1.0 / torch.log2(r + 2)
    return {"recall@1": float((r == 0).double().mean()),
            "ndcg@5": float(torch.where(r < 5, gain, 0.0).mean()),
            "ndcg@10": float(torch.where(r < 10, gain, 0.0).mean())}


def hard_negative_stats(queries) -> dict:
    """Per query: hard negatives and half matches (min / mean / max)."""
    out = {}
    for key in ("hard_negatives", "half_matches"):
        counts = [len(getattr(q, key)) for q in queries]
        out[key] = {"min": min(counts), "mean": round(sum(counts) / len(counts), 1), "max": max(counts)}
    return out


__all__ = ["DEFAULT_TEST", "QUADRANTS", "TASK", "TEMPLATES", "Page", "Query", "collection", "describe",
           "hard_negative_stats", "matches", "metrics", "mosaics", "ranks", "render"]
