"""HPC-ColPali's planted oracle (card: ../shared/methods/hpc_colpali.md "Test oracle"): keep-all
scores equal unpruned ones; one kept patch is the one receiving the most last-layer attention,
computed by hand from the unwrapped model's attention weights; options refused clearly."""

from __future__ import annotations

import pytest
import torch

import tests.cases  # noqa: F401  (the kit first: it imports tests.cases_retrieval after PixelCase)
import vlmprune
from tests.cases_retrieval import documents, image_positions, tiny_colpali
from vlmprune.retrieval import maxsim

_MODEL = []


def model():
    if not _MODEL:
        _MODEL.append(tiny_colpali())
    return _MODEL[0]


def test_keep_all_scores_equal_unpruned():
    m, docs = model(), documents("colpali", 2, seed=0)
    q = m(input_ids=torch.tensor([[2, 5, 9]])).embeddings.detach()
    with torch.no_grad():
        ref = maxsim(q, m(**docs).embeddings)
        with vlmprune.wrap(m, "hpc_colpali", budget=1.0):
            assert torch.equal(maxsim(q, m(**docs).embeddings), ref)


@pytest.mark.parametrize("budget", [1, 5])
def test_kept_patches_are_the_most_attended(budget):
    """The kept patches are the top ``budget`` by attention received in the last decoder layer
    from the prompt's text tokens after the image (mean over heads and those tokens), from
    ``output_attentions`` of the unwrapped model."""
    m, docs = model(), documents("colpali", 2, seed=4)
    with torch.no_grad():
        attn = m(**docs, output_attentions=True).attentions[-1]  # [B, H, S, S]
    image = image_positions("colpali")
    after = slice(int(image.max()) + 1, None)
    received = attn.mean(1)[:, after].mean(1)[:, image]
    with vlmprune.wrap(m, "hpc_colpali", budget=budget) as handle, handle.record() as seen, torch.no_grad():
        m(**docs)
    keep = seen[0].selection.keep
    expected = torch.sort(received.topk(budget, -1).indices, -1).values
    assert torch.equal(keep, expected)
    if budget == 1:
        assert torch.equal(keep[:, 0], received.argmax(-1))


def test_options_are_checked():
    m = model()
    with pytest.raises(ValueError, match="'codebook'.*\\[1, 256\\]"):
        vlmprune.wrap(m, "hpc_colpali", budget=0.4, codebook=512)
    with pytest.raises(ValueError, match="'binary'.*needs a codebook"):
        vlmprune.wrap(m, "hpc_colpali", budget=0.4, codebook=0, binary=True)


def test_readme_usage_indexes_and_queries(tmp_path):
    """The README's block: ``wrap(colpali, "hpc_colpali", budget=0.4, codebook=256)``, an index
    from pages (27 pages x (6 kept patches + 4 prompt tokens) = 270 vectors for K = 256), one byte
    per vector, search by queries (never pruned), saved and loaded."""
    from vlmprune.retrieval import MultiVectorIndex

    colpali = model()
    pages = [documents("colpali", 9, seed) for seed in range(3)]
    with vlmprune.wrap(colpali, "hpc_colpali", budget=0.4, codebook=256) as handle:
        index = MultiVectorIndex.from_handle(handle, colpali, pages)
        with torch.no_grad():
            scores, ids = index.search(colpali(input_ids=torch.tensor([[2, 5, 9], [3, 7, 1]])).embeddings, k=5)
    assert index.codebook.k == 256 and index.document_bytes() == [10] * 27 and index.nbytes == 270 + 256 * 16 * 4
    assert ids.shape == (2, 5) and bool((scores[:, :-1] >= scores[:, 1:]).all())
    index.save(tmp_path / "pages.pt")
    assert torch.equal(MultiVectorIndex.load(tmp_path / "pages.pt").search(torch.zeros(1, 1, 16) + 0.25, k=3).indices,
                      index.search(torch.zeros(1, 1, 16) + 0.25, k=3).indices)
