"""Property tests for every selector (exact count, sorted, unique, in range) and oracles for
the mergers, over random shapes and budgets."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmprune.primitives import (
    allocate_budget,
    bipartite_soft_matching,
    check_ratios,
    contextual_merge,
    greedy_k_center,
    max_min_diversity,
    similarity_merge,
    stride_grid_mask,
    topk_keep_order,
    uniform_grid,
)
from vlmprune.primitives.selection import cosine_distance

shapes = st.tuples(st.integers(1, 3), st.integers(2, 40), st.integers(1, 8))


def _valid_keep(keep: torch.Tensor, b: int, n: int, k: int, ordered: bool = True):
    assert keep.shape == (b, k) and keep.dtype == torch.long
    assert int(keep.min()) >= 0 and int(keep.max()) < n
    for row in keep:
        assert torch.unique(row).numel() == k
        if ordered:
            assert torch.equal(row, torch.sort(row).values)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, data=st.data())
def test_topk_keep_order(shape, data):
    b, n, _ = shape
    k = data.draw(st.integers(1, n))
    scores = torch.randn(b, n)
    keep = topk_keep_order(scores, k)
    _valid_keep(keep, b, n, k)
    for i in range(b):  # the kept ones are exactly the k largest
        kth = torch.sort(scores[i], descending=True).values[k - 1]
        assert bool((scores[i, keep[i]] >= kth).all())


@settings(max_examples=30, deadline=None)
@given(shape=shapes, data=st.data())
def test_diversity_selectors_properties(shape, data):
    b, n, c = shape
    k = data.draw(st.integers(1, n))
    x = torch.randn(b, n, c)
    _valid_keep(max_min_diversity(x, k), b, n, k)
    _valid_keep(greedy_k_center(x, k), b, n, k)
    _valid_keep(greedy_k_center(x, k, metric="euclidean"), b, n, k)
    _valid_keep(max_min_diversity(x, k, keep_order=False), b, n, k, ordered=False)


def _naive_divprune(x: torch.Tensor, k: int) -> list[int]:
    d = cosine_distance(x[None])[0]
    n = x.shape[0]
    nn = [min(d[i, j] for j in range(n) if j != i) for i in range(n)]
    picks = [max(range(n), key=lambda i: nn[i])]
    while len(picks) < k:
        rest = [i for i in range(n) if i not in picks]
        picks.append(max(rest, key=lambda i: min(d[i, j] for j in picks)))
    return picks


@pytest.mark.parametrize("seed", range(5))
def test_divprune_matches_naive_reference(seed):
    """The card's oracle: on <= 8 random points, pick order equals the O(N^2 k) reference."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, generator=gen)
    picks = max_min_diversity(x[None], 5, keep_order=False)[0].tolist()
    assert picks == _naive_divprune(x, 5)


def test_k_center_two_approximation():
    """Greedy k-center's covering radius is within 2x of the optimum (brute force, Euclidean)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 2, generator=gen)
    d = torch.cdist(x, x)
    k = 3
    picks = greedy_k_center(x[None], k, metric="euclidean")[0]
    radius = d[:, picks].min(1).values.max()
    best = min(d[:, list(c)].min(1).values.max() for c in itertools.combinations(range(9), k))
    assert radius <= 2 * best + 1e-6


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 24), cols=st.integers(1, 24), data=st.data())
def test_uniform_grid_exact_count(rows, cols, data):
    k = data.draw(st.integers(1, rows * cols))
    idx = uniform_grid(rows, cols, k)
    _valid_keep(idx[None], 1, rows * cols, k)


def test_uniform_grid_lattice():
    assert uniform_grid(4, 4, 4).tolist() == [5, 7, 13, 15]


def test_stride_grid_mask_planted():
    """``grid[::s, ::s]`` from (0, 0) on raster indices: square and non-square grids, a pruned
    subset of tokens in any order, a CLS slot (raster -1), stride 1 = every token."""
    on = lambda idx, cols, s: stride_grid_mask(torch.tensor(idx), cols, s).nonzero().flatten().tolist()  # noqa: E731
    assert on(list(range(36)), 6, 3) == [0, 3, 18, 21]
    assert on(list(range(20)), 5, 2) == [0, 2, 4, 10, 12, 14]  # 4 x 5 grid
    assert stride_grid_mask(torch.tensor([[-1, 21, 1, 3, 20, 18], [0, 4, 6, -1, 9, 35]]), 6, 3).tolist() == [
        [False, True, False, True, False, True],
        [True, False, False, False, False, False],
    ]
    assert stride_grid_mask(torch.tensor([-1, 0, 7]), 6, 1).tolist() == [False, True, True]
    with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
        stride_grid_mask(torch.arange(4), 2, 0)


def test_check_ratios():
    check_ratios("transprune", (0.875, 0.625, 0.125), (7, 9, 12))
    check_ratios("adatoken3d", (1.0, 1.0), (1, 2))  # equal ratios are non-increasing
    with pytest.raises(ValueError, match=r"option 'ratios' of method 'adatoken3d' needs one ratio per pruning layer \(8, 16\), got \(0.5,\)"):
        check_ratios("adatoken3d", (0.5,), (8, 16))
    with pytest.raises(ValueError, match="needs one ratio per pruning layer"):
        check_ratios("transprune", (), ())
    for bad in ((0.5, 0.6), (0.5, 0.0), (1.5, 0.5), (-0.1, -0.2)):
        with pytest.raises(ValueError, match=r"option 'ratios' of method 'transprune' must be non-increasing in \(0, 1\]"):
            check_ratios("transprune", bad, (1, 2))


def test_shared_helpers_written_once():
    """The methods that share a helper call the primitive, not a copy of their own."""
    from vlmprune import primitives
    from vlmprune.methods import adatoken3d, atp, feather, transprune

    assert feather.stride_grid_mask is atp.stride_grid_mask is primitives.stride_grid_mask
    assert transprune.check_ratios is adatoken3d.check_ratios is primitives.check_ratios


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), r=st.integers(1, 10), data=st.data())
def test_allocate_budget_sums_and_caps(b, r, data):
    cap = torch.tensor(data.draw(st.lists(st.integers(1, 6), min_size=r, max_size=r)))
    total = data.draw(st.integers(1, int(cap.sum())))
    w = torch.rand(b, r)
    alloc = allocate_budget(w, total, cap)
    assert alloc.shape == (b, r)
    assert bool((alloc.sum(-1) == total).all()) and bool((alloc <= cap).all()) and bool((alloc >= 0).all())


def test_allocate_budget_proportional_oracle():
    """HoloV's rule: floor(K m_c / sum m) each, remainder one each to the largest weights."""
    w = torch.tensor([[5.0, 3.0, 2.0]])
    assert allocate_budget(w, 7).tolist() == [[4, 2, 1]]  # floors 3,2,1 -> +1 to the largest


def test_tome_mass_conservation_and_length():
    x = torch.randn(2, 11, 4)
    merge, provenance, keep = bipartite_soft_matching(x, r=4, protect_first=True)
    out, size = merge(x)
    assert out.shape == (2, 7, 4) and keep.shape == (2, 7)
    torch.testing.assert_close((out * size[..., None]).sum(1), x.sum(1), atol=1e-5, rtol=1e-5)
    assert bool((size.sum(-1) == 11).all())
    assert bool((provenance[:, 0] == 0).all())  # CLS is never a source: it keeps its own slot
    # each output slot is the group of the token keep names: that token is in its own group
    assert torch.equal(provenance.gather(1, keep), torch.arange(7).expand(2, -1))
    same, ident, kept = bipartite_soft_matching(x, r=0)
    assert same(x)[0] is x and torch.equal(kept, torch.arange(11).expand(2, -1)) and torch.equal(ident, kept)


def test_tome_split_follows_the_offset_and_unmerged_order_is_optional():
    """Planted: with one prefix token before them (offset 1), tokens 1, 3, 5 are set A and 0, 2,
    4, 6 set B; token 3 copies token 2 (score 1), 5 is 0.9 from 4, 1 is 0.866 from 6, so r=1
    merges 3 into 2; the unmerged A tokens keep sequence order (1, 5), or descending best score
    (5, 1) without sorting; the merge is size-weighted."""
    metric = torch.tensor([[[1.0, 0, 0, 0], [0.5, 0, 0, 0.866], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                            [0, 0, 0.9, 0.436], [0, 0, 0, 1]]])
    merge, provenance, keep = bipartite_soft_matching(metric, r=1, offset=1)
    assert keep.tolist() == [[1, 5, 0, 2, 4, 6]] and provenance.tolist() == [[2, 0, 3, 3, 4, 1, 5]]
    _, _, unsorted = bipartite_soft_matching(metric, r=1, offset=1, sort_unmerged=False)
    assert unsorted.tolist() == [[5, 1, 0, 2, 4, 6]]
    x = torch.arange(21.0).view(1, 7, 3)
    out, size = merge(x, torch.tensor([[1.0, 1, 3, 1, 1, 1, 1]]))
    torch.testing.assert_close(out[0, 3], (3 * x[0, 2] + x[0, 3]) / 4)
    assert size.tolist() == [[1.0, 1.0, 1.0, 4.0, 1.0, 1.0]]


def test_contextual_identity_when_every_token_is_a_target():
    x = torch.randn(2, 6, 3)
    remaining = torch.tensor([[0, 2, 3, 5], [1, 2, 4, 5]])
    targets, values, owner = contextual_merge(x, torch.randn(2, 6, 3), remaining, n_contextual=4)
    assert torch.equal(targets, remaining)
    assert owner.tolist() == [[0, -1, 1, 2, -1, 3], [-1, 0, 1, -1, 2, 3]]
    torch.testing.assert_close(values, x.gather(1, remaining[..., None].expand(-1, -1, 3)))


def test_contextual_merge_mean_of_assigned():
    x = torch.arange(8.0).view(1, 4, 2)
    metric = torch.tensor([[[1.0, 0], [0, 1], [1, 0.1], [0.1, 1]]])
    targets, values, owner = contextual_merge(x, metric, torch.tensor([[0, 1, 2, 3]]), n_contextual=2)
    assert targets.tolist() == [[0, 2]]  # step 2: targets are remaining[0], remaining[2]
    assert owner.tolist() == [[0, 1, 1, 1]]  # tokens 1 and 3 went into the second contextual token
    # token 1 ~ target 0? metric[1]=(0,1) vs (1,0) -> 0, vs (1,0.1) -> 0.1: joins target 2; token 3 too
    torch.testing.assert_close(values[0, 0], x[0, 0])
    torch.testing.assert_close(values[0, 1], x[0, 2] + (x[0, 1] + x[0, 3]) / 2)


def test_similarity_merge_zero_weights_is_identity():
    x = torch.randn(1, 10, 4)
    centres = torch.tensor([[1, 4]])
    out, absorbed = similarity_merge(x, torch.randn(1, 10, 4), centres, torch.zeros(1, 10), topk=3)
    torch.testing.assert_close(out, x[:, [1, 4]])
    assert absorbed.shape == (1, 2, 3)
    assert not bool((absorbed[0, 0] == 1).any()) and not bool((absorbed[0, 1] == 4).any())  # never itself
