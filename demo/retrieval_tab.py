"""The demo's retrieval tab (Gradio): a query box over the embedded retriever's
``easyvqa-retrieval`` collection, whole or pruned by a method, showing the top pages with the
patches each kept. The model and drawing code is :mod:`vlmprune.demo.retrieval_view`; this module
is the layout."""

from __future__ import annotations

import gradio as gr

from .retrieval_view import (
    RETRIEVAL_METHODS,
    LazyCollection,
    draw_hit,
    hit_caption,
    result_text,
    search,
)

__all__ = ["retrieval_tab"]

EXAMPLE = "the top left has a green rectangle , the top right has a green triangle"


def run_search(lazy: LazyCollection, query, method, keep_percent, k=3):
    """``(markdown, [(image, caption), ...])`` for one query; errors become the markdown."""
    try:
        col = lazy.get()
        res = search(col, str(query or ""), method, float(keep_percent) / 100, int(k))
    except (ValueError, RuntimeError, OSError) as exc:
        return f"⚠ {exc}", []
    return result_text(res), [(draw_hit(col, h), hit_caption(h)) for h in res.hits]


def retrieval_tab(lazy: LazyCollection) -> None:
    gr.Markdown("**easyvqa-retrieval**: a text query over 300 test mosaics indexed by the embedded ColPali "
                "(MaxSim late interaction). Pruning acts on the pages' patch vectors only; each result shows "
                "the patches its page kept (dropped ones dimmed). Vocabulary: colours, shapes, the four "
                "quadrants, 'and', 'a', 'the', 'in', 'has', ','. The first search encodes the collection (~1 min).")
    with gr.Row():
        query = gr.Textbox(value=EXAMPLE, label="query", scale=3)
        method = gr.Dropdown(list(RETRIEVAL_METHODS), value="hpc_colpali", label="method")
        keep = gr.Slider(5, 100, value=40, step=5, label="patches kept (%)")
        go = gr.Button("Search", variant="primary")
    text = gr.Markdown()
    gallery = gr.Gallery(label="top pages", columns=3, height="auto")

    def run(query_value, method_value, keep_value):
        return run_search(lazy, query_value, method_value, keep_value)

    run.__name__ = "run_search"
    go.click(run, [query, method, keep], [text, gallery])
    query.submit(run, [query, method, keep], [text, gallery])
