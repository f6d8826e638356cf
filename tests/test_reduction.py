"""Reversible reductions (vlmprune.reduction.Reduction) on planted tensors, Runtime.run as the
adapters' one way to run a method, and the exit-restore hooks (adapters/reversible.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vlmprune
from tests.contexts import make_context
from vlmprune.adapters.base import Installed
from vlmprune.adapters.reversible import install_exit_restore
from vlmprune.adapters.runtime import Runtime
from vlmprune.context import ModelInfo, Selection, StageSpec
from vlmprune.reduction import Reduction


def planted(b=2, n=5, c=2):
    """``x[i, t] = (100 i + 10 t, 100 i + 10 t + 1)``: every value says its row and token."""
    base = 100 * torch.arange(b)[:, None, None] + 10 * torch.arange(n)[None, :, None]
    return (base + torch.arange(c)).float()


# ================================================================================ apply / tokens
def test_apply_gathers_every_aligned_tensor_in_keep_order():
    x = planted()
    red = Reduction(Selection(keep=torch.tensor([[3, 0], [1, 4]])), n=5)
    assert torch.equal(red.apply(x), torch.tensor([[[30.0, 31], [0, 1]], [[110, 111], [140, 141]]]))
    positions = torch.tensor([[5, 6, 7, 8, 9], [0, 1, 2, 3, 4]])
    assert torch.equal(red.apply(positions), torch.tensor([[8, 5], [1, 4]]))
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(red.apply(mask), torch.tensor([[True, True], [True, False]]))
    channels_first = x.transpose(1, 2)  # [B, C, N]: tokens along the last dimension
    assert torch.equal(red.apply(channels_first, dim=-1), red.apply(x).transpose(1, 2))
    with pytest.raises(ValueError, match="'dim'.*batch"):
        red.apply(x, dim=0)


def test_prefix_passes_through_and_lengths_are_checked():
    x = planted(n=6)  # token 0: CLS (the prefix), tokens 1..5: the five of ctx.tokens
    red = Reduction(Selection(keep=torch.tensor([[4, 1], [0, 2]])), n=5, prefix=1)
    assert torch.equal(red.apply(x), torch.tensor([[[0.0, 1], [50, 51], [20, 21]], [[100, 101], [110, 111], [130, 131]]]))
    assert torch.equal(red.apply(x[:, 1:]), red.apply(x)[:, 1:])  # without the prefix: the tokens only
    with pytest.raises(ValueError, match=r"x has 7 tokens along dimension 1; expected one of \[5, 6\]"):
        red.apply(planted(n=7))


def test_tokens_substitutes_merged_values_of_its_space():
    x = planted()
    merged = torch.full((2, 2, 2), 7.0, dtype=torch.float64)
    sel = Selection(keep=torch.tensor([[0, 2], [1, 3]]), merged=merged)
    out = Reduction(sel, n=5).tokens(x)
    assert out.dtype == torch.float32 and torch.equal(out, torch.full((2, 2, 2), 7.0))
    with_cls = Reduction(sel, n=4, prefix=1).tokens(x)  # prefix first, then the merged values
    assert torch.equal(with_cls[:, 0], x[:, 0]) and torch.equal(with_cls[:, 1:], torch.full((2, 2, 2), 7.0))
    projected = Selection(keep=sel.keep, merged=merged, merged_space="projected")
    assert torch.equal(Reduction(projected, n=5).tokens(x), Reduction(projected, n=5).apply(x))
    assert torch.equal(Reduction(projected, n=5).tokens(x, spaces=("tokens", "projected")), out)


def test_ragged_keep_lists_reduce_and_restore_per_row():
    x = planted(n=4)
    sel = Selection(keep=[torch.tensor([2, 0, 3]), torch.tensor([1])], merge_map=torch.tensor([[1, 1, 0, 2], [-1, 0, 0, -1]]))
    red = Reduction(sel, n=4)
    rows = red.apply(x)
    assert [r.tolist() for r in rows] == [[[20, 21], [0, 1], [30, 31]], [[110, 111]]]
    y = [r + 1000 for r in rows]
    copied = red.restore(y)
    assert copied.tolist() == [
        [[1000, 1001], [1000, 1001], [1020, 1021], [1030, 1031]],  # token 1 was merged into token 0
        [[0, 0], [1110, 1111], [1110, 1111], [0, 0]],  # token 2 merged into token 1; 0 and 3 dropped
    ]
    zeroed = red.restore(y, fill="zero")
    assert zeroed.tolist() == [[[1000, 1001], [0, 0], [1020, 1021], [1030, 1031]], [[0, 0], [1110, 1111], [0, 0], [0, 0]]]
    assert [s.tolist() for s in red.sizes] == [[1.0, 2.0, 1.0], [2.0]]
    merged = Selection(keep=sel.keep, merged=[torch.zeros(3, 2), torch.ones(1, 2)])
    assert [t.tolist() for t in Reduction(merged, n=4).tokens(x)] == [[[0, 0]] * 3, [[1, 1]]]


# ================================================================================ restore
def test_restore_copy_and_zero_on_a_planted_merge_with_prefix():
    x = planted(n=6)  # CLS + 5 tokens
    sel = Selection(keep=torch.tensor([[0, 3], [4, 1]]), merge_map=torch.tensor([[0, 0, -1, 1, 1], [1, 1, -1, 0, 0]]))
    red = Reduction(sel, n=5, prefix=1)
    y = red.apply(x) + 0.5
    cls = x[:, :1] + 0.5
    t = lambda i, j: [100 * i + 10 * j + 0.5, 100 * i + 10 * j + 1.5]  # y's entry for token j (x's j + 1) of row i
    copied = red.restore(y)
    assert torch.equal(copied[:, :1], cls)
    assert copied[:, 1:].tolist() == [
        [t(0, 1), t(0, 1), [0, 0], t(0, 4), t(0, 4)],
        [t(1, 2), t(1, 2), [0, 0], t(1, 5), t(1, 5)],
    ]
    assert red.restore(y, fill="zero")[:, 1:].tolist() == [
        [t(0, 1), [0, 0], [0, 0], t(0, 4), [0, 0]],
        [[0, 0], t(1, 2), [0, 0], [0, 0], t(1, 5)],
    ]
    with pytest.raises(ValueError, match=r"parameter 'fill' must be one of \['copy', 'zero'\], got 'mean'"):
        red.restore(y, fill="mean")
    bad = Reduction(Selection(keep=torch.tensor([[0, 1]]), merge_map=torch.tensor([[0, 2, 1]])), n=3)
    with pytest.raises(ValueError, match="merge_map"):
        bad.restore(torch.zeros(1, 2, 1))


@pytest.mark.parametrize("fill", ["copy", "zero"])
def test_restore_inverts_apply_when_everything_is_kept(fill):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, generator=gen)
    keep = torch.stack([torch.randperm(6, generator=gen) for _ in range(2)])  # every token, any order
    red = Reduction(Selection(keep=keep, merge_map=torch.argsort(keep, 1)), n=6, prefix=1)
    assert torch.equal(red.restore(red.apply(x), fill=fill), x)
    assert torch.equal(red.sizes, torch.ones(2, 6))
    ragged = Reduction(Selection(keep=list(keep)), n=6, prefix=1)
    assert torch.equal(ragged.restore(ragged.apply(x), fill=fill), x)


# ================================================================================ sizes
def test_sizes_accumulate_over_two_points():
    first = Reduction(
        Selection(keep=torch.tensor([[0, 2, 5], [1, 3, 4]]), merge_map=torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 2, 1, 2, 2]])),
        n=6,
    )
    assert torch.equal(first.sizes, torch.tensor([[2.0, 3, 1], [2, 1, 3]]))
    second = Reduction(Selection(keep=torch.tensor([[2, 0], [1, 2]]), merge_map=torch.tensor([[1, 0, 0], [-1, 0, 1]])), n=3,
                       sizes=first.sizes)
    assert torch.equal(second.sizes, torch.tensor([[4.0, 2], [1, 3]]))  # a dropped token's size is gone
    pruned = Reduction(Selection(keep=torch.tensor([[1], [0]])), n=3, sizes=first.sizes)  # no merge map: gathered
    assert torch.equal(pruned.sizes, torch.tensor([[3.0], [2]]))
    with_cls = Reduction(second.selection, n=3, prefix=1, sizes=torch.cat([torch.ones(2, 1), first.sizes], 1))
    assert torch.equal(with_cls.sizes, torch.tensor([[1.0, 4, 2], [1, 1, 3]]))


def test_of_reads_n_and_prefix_from_the_context():
    info = ModelInfo("toy", {"blocks": StageSpec("blocks", "inside", prefix=2)}, grid=(2, 2), n_tokens=4)
    ctx = make_context(torch.zeros(1, 4, 3), 2, {}, info, "blocks", 1)
    red = Reduction.of(Selection(keep=torch.tensor([[1, 3]])), ctx)
    assert (red.n, red.prefix, red.ctx) == (4, 2, ctx)
    assert torch.equal(red.apply(planted(1, 6))[0, :, 0], torch.tensor([0.0, 10, 30, 50]))


# ================================================================================ Runtime.run in the adapters
class Probe(vlmprune.Method):
    """Keeps every other token at an encoder, the projector and an llm point, with merged values
    at the encoder and projector (each kept token plus one)."""

    name = "probe_reduction"
    stages = ("encoder", "projector", "llm")

    def points(self, info):
        return [vlmprune.Point("encoder", 2), vlmprune.Point("projector"), vlmprune.Point("llm", 2)]

    def select(self, ctx):
        keep = torch.arange(0, ctx.n, 2, device=ctx.tokens.device).expand(ctx.tokens.shape[0], -1)
        if ctx.stage == "llm":
            return Selection(keep=keep)
        values = ctx.tokens.gather(1, keep[..., None].expand(-1, -1, ctx.tokens.shape[-1])) + 1
        return Selection(keep=keep, merged=values)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_adapters_run_every_point_through_runtime_run(family, monkeypatch):
    from tests.tiny import batch, qwen_batch, tiny_llava, tiny_qwen

    if family == "llava":
        model, inputs = tiny_llava(layers=3), batch([[10, 11], [12]])
    else:
        model, inputs = tiny_qwen(), qwen_batch([[10, 11], [12]], [(4, 4), (4, 4)])
    seen = []
    original = Runtime.run

    def spy(self, *args, **kwargs):
        red = original(self, *args, **kwargs)
        seen.append(red)
        return red

    monkeypatch.setattr(Runtime, "run", spy)
    with vlmprune.wrap(model, Probe(), budget=1.0) as handle, handle.record() as records, torch.no_grad():
        model(**inputs)
    assert [str(r.ctx.point) for r in seen] == ["encoder:2", "projector", "llm:2"]
    assert [r.selection for r in seen] == [rec.selection for rec in records]
    assert all(r.selection is rec.selection for r, rec in zip(seen, records))
    first, second = seen[0].ctx.n, seen[1].ctx.n
    assert second == len(range(0, first, 2))  # the projector saw what the encoder point kept
    assert [p["out"] for p in handle.stats["points"]] == [[len(range(0, r.ctx.n, 2))] * 2 for r in seen]


# ================================================================================ restore at exit
class Branch(nn.Module):
    """A residual branch (a transformer block's MLP): ``mlp(h) * mask``."""

    def __init__(self, c):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, hidden_states, attention_mask=None):
        out = self.mlp(hidden_states)
        return out if attention_mask is None else out * attention_mask[..., None]


class ToyBlock(nn.Module):
    """``x + branch(norm(x), mask)``."""

    def __init__(self, c=4):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.branch = Branch(c)

    def forward(self, x, mask=None):
        return x + self.branch(self.norm(x), attention_mask=mask)


def toy(seed=0):
    torch.manual_seed(seed)
    block = ToyBlock().eval()
    for p in block.parameters():
        nn.init.normal_(p)
    return block


def test_exit_restore_keep_all_is_bit_identical_and_unwraps():
    block = toy()
    x = torch.randn(2, 6, 4)
    mask = torch.tensor([[1.0, 1, 1, 0, 1, 1], [1, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        plain = block(x, mask)
        installed = Installed()
        keep_all = Reduction(Selection(keep=torch.arange(6).expand(2, -1)), n=6)
        install_exit_restore(installed, block.branch, lambda h: keep_all, aligned={"attention_mask": 1})
        hooked = block(x, mask)
        installed.remove()
        after = block(x, mask)
    assert torch.equal(hooked, plain) and torch.equal(after, plain)
    assert not block.branch._forward_pre_hooks and not block.branch._forward_hooks


def test_exit_restore_merges_on_entry_and_unmerges_on_exit():
    block = toy(1)
    x = torch.randn(2, 6, 4)  # token 0: CLS (prefix), tokens 1..5 merged in pairs
    mask = torch.tensor([[1.0, 1, 0, 1, 1, 1], [1, 1, 1, 1, 0, 1]])
    keep = torch.tensor([[0, 2, 4], [1, 2, 3]])
    merge_map = torch.tensor([[0, 0, 1, 2, 2], [0, 0, 1, 2, 2]])
    calls = []

    def reduction_for(h):  # ToMe-like: each kept token becomes the mean of its group
        groups = [[(merge_map[i] == j).nonzero().flatten() + 1 for j in range(3)] for i in range(2)]
        merged = torch.stack([torch.stack([h[i, g].mean(0) for g in groups[i]]) for i in range(2)])
        red = Reduction(Selection(keep=keep, merged=merged, merge_map=merge_map), n=5, prefix=1)
        calls.append((h.clone(), red))
        return red

    installed = Installed()
    install_exit_restore(installed, block.branch, reduction_for, aligned={"attention_mask": 1})
    with torch.no_grad():
        got = block(x, mask)
        installed.remove()
        h, red = calls[0]
        assert torch.equal(h, block.norm(x))
        # by hand: the branch on [CLS, merged groups] with their tokens' mask entries, each group's
        # output copied back to every member (ToMe's unmerge), the CLS row as it is
        reduced_mask = torch.stack([mask[i, torch.cat([torch.tensor([0]), keep[i] + 1])] for i in range(2)])
        inner = block.branch(torch.cat([h[:, :1], red.selection.merged], 1), reduced_mask)
        unmerged = torch.cat([inner[:, :1], torch.stack([inner[i, 1 + merge_map[i]] for i in range(2)])], 1)
        assert torch.equal(red.restore(inner, "copy"), unmerged)
        assert torch.equal(got, x + unmerged)
    assert len(calls) == 1


def test_exit_restore_refuses_bad_arguments():
    block = toy()
    with pytest.raises(ValueError, match=r"parameter 'fill' must be one of \['copy', 'zero'\]"):
        install_exit_restore(Installed(), block.branch, lambda h: None, fill="nearest")
    ragged = Reduction(Selection(keep=[torch.tensor([0]), torch.tensor([0, 1])]), n=6)
    installed = Installed()
    install_exit_restore(installed, block.branch, lambda h: ragged)
    with pytest.raises(ValueError, match=r"\[B, k\] keep"):
        block(torch.randn(2, 6, 4))
    installed.remove()
