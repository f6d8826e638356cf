"""The demo's retrieval view without Gradio: a text query over the ``easyvqa-retrieval`` test
collection (:mod:`vlmprune.embedded.retrieval_task`) indexed by the embedded retriever
(``assets/embedded_colpali``), whole or with its pages pruned by a method, and the top pages with
the patches each kept (dropped patches dimmed, kept ones outlined).

Pure functions of a :class:`Collection` (a retriever, its tokenizer and the pages' cached tower
features), testable without Gradio; the tab's layout is :func:`vlmprune.demo.retrieval_tab.retrieval_tab`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

import vlmprune
from vlmprune.embedded import colpali
from vlmprune.embedded import retrieval_task as task
from vlmprune.retrieval import maxsim

from .engine import LazyModel
from .view import TokenView, draw_overlay, full_view, token_view

#: the methods the tab offers (the benchmark's pruning rows); "none": every patch
RETRIEVAL_METHODS = ("none", "hpc_colpali", "divprune", "uniform", "random")
BATCH = 16


@dataclass
class Collection:
    """The pages (:class:`~vlmprune.embedded.retrieval_task.Page`), their task queries, and the
    retriever with the pages' tower features (``[N, 256, width]``, see
    :class:`~vlmprune.embedded.colpali.FeatureTower`); indexed pages are memoised per setting."""

    model: object
    tokenizer: object
    pages: list
    queries: list
    feats: object
    indexed: dict = field(default_factory=dict)

    @classmethod
    def build(cls, model, tokenizer, n: int = task.DEFAULT_TEST["n"], seed: int = task.DEFAULT_TEST["seed"]):
        """The test collection of ``n`` pages, encoded once by ``model``'s tower."""
        from vlmprune.tools.eval_retrieval import tower_features

        pages, queries = task.collection("test", n, seed)
        feats = tower_features(model, [p.image() for p in pages], colpali.image_processor())
        return cls(model, tokenizer, pages, queries, feats)

    @property
    def grid(self) -> tuple[int, int]:
        return (colpali.GRID, colpali.GRID)


@dataclass
class Hit:
    rank: int
    page: int
    score: float
    view: TokenView
    relevant: bool


@dataclass
class SearchResult:
    query: str
    method: str
    budget: float | None
    hits: list[Hit]
    #: the page the query was written for (a task query), else None; its rank (0-based)
    target: int | None
    target_rank: int | None


def _check(method: str, budget) -> None:
    if method not in RETRIEVAL_METHODS:
        raise ValueError(f"method must be one of {list(RETRIEVAL_METHODS)}, got {method!r}")
    if method != "none" and not (budget is not None and 0 < budget <= 1):
        raise ValueError(f"budget must be a fraction of the patches kept in (0, 1], got {budget!r}")


def index_pages(col: Collection, method: str = "none", budget: float | None = None):
    """``(embeddings [N, L, D], views)``: the pages as ``method`` at ``budget`` keeps them
    (``"none"``: whole), and per page the patches kept (memoised per setting)."""
    import torch

    _check(method, budget)
    key = (method, None if method == "none" else float(budget))
    if key in col.indexed:
        return col.indexed[key]
    model, tower = col.model, col.model.vlm.vision_tower
    model.vlm.vision_tower = colpali.FeatureTower(tower)
    batches, views = [], []
    try:
        handle = None
        if method != "none":
            handle = vlmprune.wrap(model, method, budget=budget, **({"codebook": 0} if method == "hpc_colpali" else {}))
        for s in range(0, len(col.pages), BATCH):
            inputs = colpali.document_inputs(col.feats[s:s + BATCH], col.tokenizer)
            with torch.no_grad():
                if handle is None:
                    batches.append(model(**inputs).embeddings)
                    views += [full_view(col.grid)] * inputs["input_ids"].shape[0]
                    continue
                with handle.record() as records:
                    batches.append(model(**inputs).embeddings)
            views += [token_view(records, grid=col.grid, image=j) for j in range(inputs["input_ids"].shape[0])]
    finally:
        if method != "none":
            handle.unwrap()
        model.vlm.vision_tower = tower
    longest = max(b.shape[1] for b in batches)
    emb = torch.cat([torch.nn.functional.pad(b, (0, 0, 0, longest - b.shape[1])) for b in batches])
    col.indexed[key] = (emb, views)
    return col.indexed[key]


def search(col: Collection, query: str, method: str = "none", budget: float | None = None, k: int = 3) -> SearchResult:
    """The top ``k`` pages for ``query`` (MaxSim over what each page kept)."""
    import torch

    query = " ".join(query.lower().split())
    if not query:
        raise ValueError("the query is empty: describe two quadrants, e.g. 'red circle in the top left and "
                         "blue triangle in the bottom right'")
    emb, views = index_pages(col, method, budget)
    with torch.no_grad():
        q = col.model(**colpali.query_inputs([query], col.tokenizer)).embeddings
    scores = maxsim(q, emb)[0]
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    target = next((q.page for q in col.queries if q.text == query), None)
    hits = [Hit(r, p, float(scores[p]), views[p], p == target) for r, p in enumerate(order[:k])]
    return SearchResult(query, method, None if method == "none" else budget, hits, target,
                        None if target is None else order.index(target))


def draw_hit(col: Collection, hit: Hit, width: int = 224) -> Image.Image:
    """The page with the patches it kept (dropped ones dimmed, kept ones outlined)."""
    return draw_overlay(col.pages[hit.page].image(), hit.view, width, outline=hit.view.n_kept < hit.view.owner.size)


def hit_caption(hit: Hit) -> str:
    mark = " ✓ relevant" if hit.relevant else ""
    return f"#{hit.rank + 1}: page {hit.page}, score {hit.score:.2f}, patches {hit.view.n_kept}/{hit.view.owner.size}{mark}"


def result_text(res: SearchResult) -> str:
    """Markdown: the query, the setting and where the page it describes ranks."""
    setting = "all patches" if res.method == "none" else f"{res.method} keeping {100 * res.budget:g} % of the patches"
    where = ("" if res.target is None else
             f" The page this task query was written for ranks **#{res.target_rank + 1}**.")
    return f"*{res.query}* — {setting}.{where}"


def sample_queries(col: Collection, n: int = 8) -> list[str]:
    """The first ``n`` task queries (each describes one page of the collection)."""
    return [q.text for q in col.queries[:n]]


class LazyCollection(LazyModel):
    """A :class:`Collection`, or a loader called on first use (once; a failure is retried)."""

    kind = Collection

    def __init__(self, source=None):
        if source is None:
            def source():
                model, tok = colpali.load_retriever(attn_implementation="eager")
                return Collection.build(model, tok)
        super().__init__(source)


__all__ = ["RETRIEVAL_METHODS", "Collection", "Hit", "LazyCollection", "SearchResult", "draw_hit", "hit_caption",
           "index_pages", "result_text", "sample_queries", "search"]
