"""The demo's retrieval view (demo/retrieval_view.py, demo/retrieval_tab.py) on a tiny ColPali
built from a config: a query ranks the collection by MaxSim over what each page kept, and each
hit shows its kept patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("easy_vqa")


@pytest.fixture(scope="module")
def col():
    from vlmprune.demo.retrieval_view import Collection

    from vlmprune.tools.eval_retrieval import tiny_retriever

    model, tok = tiny_retriever(seed=0)
    return Collection.build(model, tok, n=6, seed=0)


def test_search_ranks_by_maxsim_over_the_kept_patches(col):
    from vlmprune.demo.retrieval_view import search

    import vlmprune
    from vlmprune.embedded import colpali
    from vlmprune.retrieval import maxsim

    query = col.queries[2].text
    res = search(col, query.upper(), "uniform", 0.25, k=3)
    assert res.target == 2 and [h.rank for h in res.hits] == [0, 1, 2]
    # by hand: the unwrapped model on the pages' pixels, uniform's kept rows, MaxSim
    model, tok = col.model, col.tokenizer
    with torch.no_grad(), vlmprune.wrap(model, "uniform", budget=0.25):
        pages = model(**colpali.document_inputs([p.image() for p in col.pages], tok)).embeddings
    with torch.no_grad():
        q = model(**colpali.query_inputs([query], tok)).embeddings
    scores = maxsim(q, pages)[0]
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    assert [h.page for h in res.hits] == order[:3] and res.target_rank == order.index(2)
    assert [h.score for h in res.hits] == pytest.approx(scores[order[:3]].tolist(), abs=1e-4)
    assert all(h.relevant == (h.page == 2) for h in res.hits)
    # uniform keeps the same 64 of 256 patches on every page
    assert all(h.view.n_kept == 64 and h.view.grid == (16, 16) for h in res.hits)
    assert len({tuple(np.flatnonzero(h.view.kept)) for h in res.hits}) == 1
    full = search(col, "red circle in the top left and blue circle in the top right", "none")
    assert full.target is None and all(h.view.n_kept == 256 for h in full.hits)
    assert vlmprune.Handle.of(model) is None and isinstance(model.vlm.vision_tower, type(col.model.vlm.vision_tower))
    with pytest.raises(ValueError, match="method must be one of"):
        search(col, query, "fastv", 0.5)
    with pytest.raises(ValueError, match="query is empty"):
        search(col, "  ", "none")


def test_drawing_dims_dropped_patches_and_captions(col):
    from vlmprune.demo.retrieval_view import draw_hit, hit_caption, result_text, search

    res = search(col, col.queries[0].text, "uniform", 0.25, k=2)
    hit = res.hits[0]
    img = draw_hit(col, hit, width=224)
    assert isinstance(img, Image.Image) and img.size == (224, 224)
    page, drawn = np.asarray(col.pages[hit.page].image(), float), np.asarray(img, float)
    inner = np.zeros((16, 16, 14, 14), dtype=bool)
    inner[:, :, 3:11, 3:11] = True
    inner = inner.transpose(0, 2, 1, 3).reshape(224, 224)
    dropped = np.repeat(np.repeat(hit.view.dropped.reshape(16, 16), 14, 0), 14, 1) & inner
    kept = np.repeat(np.repeat(hit.view.kept.reshape(16, 16), 14, 0), 14, 1) & inner
    assert drawn[dropped].mean() < 0.5 * page[dropped].mean()
    assert abs(drawn[kept].mean() - page[kept].mean()) < 0.15 * page[kept].mean()
    assert hit_caption(hit).startswith(f"#1: page {hit.page}, score ") and "patches 64/256" in hit_caption(hit)
    text = result_text(res)
    assert col.queries[0].text in text and "uniform keeping 25 % of the patches" in text
    assert f"ranks **#{res.target_rank + 1}**" in text


def test_app_retrieval_tab_builds_and_runs(col):
    gr = pytest.importorskip("gradio")
    from vlmprune.demo.app import build_app
    from vlmprune.demo.engine import DemoError, ModelStore
    from vlmprune.demo.retrieval_view import LazyCollection

    store = ModelStore(loader=lambda spec: (_ for _ in ()).throw(DemoError(f"cannot load {spec}")))
    app = build_app(store=store, samples=[], retrieval=LazyCollection(col))
    assert any(isinstance(b, gr.Tab) and "Retrieval" in str(b.label) for b in app.blocks.values())
    run = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "run_search")
    text, gallery = run(col.queries[1].text, "hpc_colpali", 40)
    assert "hpc_colpali keeping 40 % of the patches" in text and len(gallery) == 3
    assert all(isinstance(im, Image.Image) and "patches 102/256" in cap for im, cap in gallery)
    text, gallery = run("a purple hexagon", "none", 100)
    assert text.startswith("⚠") and "vocabulary" in text and gallery == []
