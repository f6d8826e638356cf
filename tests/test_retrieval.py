"""The retriever adapter and vlmprune.retrieval: MaxSim over kept embeddings by hand, queries
untouched, ragged batches, bytes per document, K-means codes, Hamming, index save/load."""

from __future__ import annotations

import pytest
import torch

import tests.cases  # noqa: F401  (the kit first: it imports tests.cases_retrieval after PixelCase)
import vlmprune
from tests.cases_retrieval import (
    END,
    IMAGE,
    PROMPT,
    QWEN_PATCH_DIM,
    START,
    documents,
    image_positions,
    tiny_colpali,
    tiny_colqwen2,
)
from vlmprune.retrieval import Codebook, MultiVectorIndex, hamming, maxsim, to_bits

QUERY = torch.tensor([[2, 5, 9, 11], [3, 7, 1, 0]])
QUERY_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
_MODELS = {}


def model(kind="colpali"):
    if kind not in _MODELS:
        _MODELS[kind] = tiny_colpali() if kind == "colpali" else tiny_colqwen2()
    return _MODELS[kind]


def queries(m):
    with torch.no_grad():
        return m(input_ids=QUERY, attention_mask=QUERY_MASK).embeddings


@pytest.mark.parametrize("kind", ["colpali", "colqwen2"])
def test_maxsim_over_kept_embeddings_equals_by_hand(kind):
    """Scores of the wrapped model's queries against its pruned documents equal a loop over each
    document's prompt tokens and recorded kept patches of the unwrapped model's embeddings; the
    query side passes through untouched."""
    m, docs = model(kind), documents(kind, 3, seed=7)
    q = queries(m)
    with torch.no_grad():
        full = m(**docs).embeddings
    with vlmprune.wrap(m, "divprune", budget=0.25) as handle, handle.record() as seen:
        assert torch.equal(queries(m), q)
        with torch.no_grad():
            kept = m(**docs).embeddings
    assert kept.shape[1] == len(PROMPT) + 4 + (2 if kind == "colqwen2" else 0)
    ((_, sel),) = [(r.point, r.selection) for r in seen]
    where = image_positions(kind)
    scores = maxsim(q, kept)
    for qi in range(q.shape[0]):
        for d in range(3):
            patches = set(where[sel.keep[d]].tolist())
            rows = [t for t in range(full.shape[1]) if t not in set(where.tolist()) or t in patches]
            total = 0.0
            for i in range(int(QUERY_MASK[qi].sum())):
                total += max(float(q[qi, i] @ full[d, t]) for t in rows)
            assert scores[qi, d].item() == pytest.approx(total, abs=1e-5)
    assert handle.stats["bytes_per_document"] == [4 * 16 * 4] * 3


def test_padding_rows_are_masked_out():
    """A document whose real rows all score below zero against a query: a zero padding row
    would win the max (score 0) if it were not masked."""
    q = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # second row: query padding
    d = torch.tensor([[[-1.0, 0.0], [-0.5, 0.5], [0.0, 0.0]], [[0.5, 0.5], [0.0, 0.0], [0.0, 0.0]]])
    assert maxsim(q, d).tolist() == [[-0.5, 0.5]]


@pytest.mark.parametrize("method", ["uniform", "hpc_colpali"])
def test_ragged_colqwen2_batch_equals_each_page_alone(method):
    """Pages of different grids (4 x 4 and 4 x 6 tokens) in one padded batch: one method call
    per page, kept sets of different sizes padded with zero rows, scores as each page alone."""
    m = model("colqwen2")
    gen = torch.Generator().manual_seed(3)
    pix = [torch.randn(64, QWEN_PATCH_DIM, generator=gen), torch.randn(96, QWEN_PATCH_DIM, generator=gen)]
    rows = [[START] + [IMAGE] * 16 + [END] + PROMPT, [START] + [IMAGE] * 24 + [END] + PROMPT]
    ids = torch.tensor([rows[0] + [0] * 8, rows[1]])
    mask = torch.tensor([[1] * 22 + [0] * 8, [1] * 30])
    pv = torch.stack([torch.cat([pix[0], torch.zeros(32, QWEN_PATCH_DIM)]), pix[1]])
    thw = torch.tensor([[1, 8, 8], [1, 8, 12]])
    q = queries(m)
    with vlmprune.wrap(m, method, budget=0.5) as handle, torch.no_grad():
        batch = m(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw).embeddings
        assert handle.stats["points"][-1]["out"] == [8, 12]
        alone = [m(input_ids=torch.tensor([r]), pixel_values=p[None], image_grid_thw=t[None]).embeddings
                 for r, p, t in zip(rows, pix, thw)]
    assert batch.shape[1] == 12 + 2 + len(PROMPT) and bool((batch[0, 14:] == 0).all())
    torch.testing.assert_close(maxsim(q, batch), torch.cat([maxsim(q, a) for a in alone], 1), atol=1e-4, rtol=0)


def test_hpc_colpali_needs_eager_attention():
    m = tiny_colpali(seed=1)
    m.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="received_attention.*eager"):
        vlmprune.wrap(m, "hpc_colpali", budget=0.4)


def test_codes_decode_to_their_centroids_and_fit_in_a_byte():
    """K >= distinct points: every point is its own centroid (decode reproduces it); codes are
    uint8, below K, and each decodes to the centroid it names."""
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(6, 8, generator=gen)
    data = points[torch.randint(0, 6, (40,), generator=gen)]
    book = Codebook.fit(data, k=6, seed=0)
    codes = book.encode(data)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 6 and book.bits == 3
    torch.testing.assert_close(book.decode(codes), data, atol=1e-6, rtol=0)
    assert torch.equal(book.encode(book.centroids), torch.arange(6, dtype=torch.uint8))
    assert torch.equal(Codebook.fit(data, k=6, seed=0).centroids, book.centroids)  # seeded
    with pytest.raises(ValueError, match="'codebook' must be an int in \\[1, 256\\]"):
        Codebook.fit(data, k=300)


def test_hamming_is_popcount_of_xor():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 256, (5,), generator=gen), torch.randint(0, 256, (7,), generator=gen)
    dist = hamming(to_bits(a, 8), to_bits(b, 8))
    for i in range(5):
        for j in range(7):
            assert int(dist[i, j]) == (int(a[i]) ^ int(b[j])).bit_count()
    assert int(hamming(to_bits(a, 8), to_bits(a, 8)).diagonal().max()) == 0
    assert torch.equal(to_bits(torch.tensor([5]), 3), torch.tensor([[True, False, True]]))


@pytest.mark.parametrize("codebook, binary, mode", [(0, False, "float"), (8, False, "codes"), (8, True, "binary")])
def test_index_saved_and_loaded_answers_identically(tmp_path, codebook, binary, mode):
    """``wrap(..., "hpc_colpali", budget=0.4, codebook=K)`` indexes pages (6 of 16 patches and 4
    prompt tokens each); the index's bytes per document are 10 x 16 x 4 floats, 10 codes or 10 x 3
    packed bits, plus K x 16 x 4 for the codebook; saved and loaded, it answers identically."""
    m = model()
    with vlmprune.wrap(m, "hpc_colpali", budget=0.4, codebook=codebook, binary=binary) as handle:
        index = MultiVectorIndex.from_handle(handle, m, [documents("colpali", 3, s) for s in range(2)])
        q = queries(m)
    assert index.mode == mode and len(index) == 6
    per_doc = {"float": 10 * 16 * 4, "codes": 10, "binary": 4}[mode]
    assert index.document_bytes() == [per_doc] * 6
    assert index.nbytes == 6 * per_doc + (codebook * 16 * 4)
    index.save(tmp_path / "index.pt")
    loaded = MultiVectorIndex.load(tmp_path / "index.pt")
    assert torch.equal(loaded.scores(q), index.scores(q))
    assert torch.equal(loaded.search(q, 3).indices, index.search(q, 3).indices)
    if mode == "codes":  # MaxSim over the decoded centroids
        docs = torch.stack([index.codebook.decode(d) for d in index.docs])
        torch.testing.assert_close(index.scores(q), maxsim(q, docs))


def test_sdpa_retriever_prunes_by_hand():
    """Under SDPA (no attention weights) the token-only selectors run: DivPrune's kept patches
    and the prompt tokens, in sequence order, are the unwrapped model's rows."""
    m, docs = tiny_colpali(seed=2), documents("colpali", 2, seed=5)
    m.set_attn_implementation("sdpa")
    with torch.no_grad():
        full = m(**docs).embeddings
        with vlmprune.wrap(m, "divprune", budget=3) as handle, handle.record() as seen:
            kept = m(**docs).embeddings
    for i, keep in enumerate(seen[0].selection.keep):
        rows = torch.cat([torch.sort(keep).values, torch.arange(16, 16 + len(PROMPT))])
        torch.testing.assert_close(kept[i], full[i, rows], atol=1e-6, rtol=0)


def test_binary_scores_equal_a_per_document_hamming_reference():
    """The table-driven, all-documents-at-once binary scoring equals bits - Hamming per document."""
    from vlmprune.retrieval import valid_rows

    gen = torch.Generator().manual_seed(3)
    docs = [torch.randn(2, 9, 6, generator=gen) for _ in range(3)]
    docs[1][0, 5:] = 0  # a shorter document
    index = MultiVectorIndex.build(docs, codebook=5, binary=True, seed=0)
    queries = torch.randn(4, 7, 6, generator=gen)
    queries[2, 4:] = 0
    bits = index.codebook.bits
    q_bits = to_bits(index.codebook.encode(queries), bits)
    expected = torch.zeros(4, len(index))
    for n, codes in enumerate(index.docs):
        sim = bits - hamming(q_bits, to_bits(codes, bits)[None].expand(4, -1, -1))
        expected[:, n] = (sim.max(-1).values * valid_rows(queries)).sum(-1).float()
    assert torch.equal(index.scores(queries), expected)
    index.add(torch.randn(1, 9, 6, generator=gen))  # a new document invalidates the padded cache
    assert index.scores(queries).shape == (4, 7)
