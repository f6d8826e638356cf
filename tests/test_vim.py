"""The vision-Mamba adapter (adapters/mamba.py) and ToP-ViM (vlmprune/methods/top_vim.py) on tiny
random :class:`VimClassifier` models: the card's planted oracle (../shared/methods/top_vim.md), scan
order, the class token at any position, batch = singles with different kept sets, unwrap, refusals.
The conformance kit runs the Vim case too (tests/cases_vim.py)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from vlmprune.adapters.mamba import VimAdapter

import tests.cases
import vlmprune
from tests.cases_vim import run_by_hand, sequence_and_logits, tiny_vim
from tests.truth import hook_count, record_selections
from vlmprune.context import Selection, Signals, TokenContext
from vlmprune.embedded.vim_model import VimClassifier, VimConfig
from vlmprune.method import Method
from vlmprune.methods.top_vim import ToPViM

torch.set_num_threads(1)


def pixels(n: int, seed: int = 0, side: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


@dataclass
class RowKeep(Method):
    """Test method: keep ``rows[i]`` (patch indices, as given: unsorted ones test the refusal) in
    row ``i`` at ``mixer:layer``."""

    name = "test_row_keep"
    roles = ("inside",)
    rows: tuple = ()
    layer: int = 2

    def points(self, info):
        return [vlmprune.Point("mixer", self.layer)]

    def select(self, ctx):
        return Selection(keep=torch.tensor([self.rows[i] for i in ctx.images]))


def vim_24() -> VimClassifier:
    """Vim-S's token layout (14 x 14 = 196 patches + a middle class token, 24 blocks), tiny width."""
    torch.manual_seed(0)
    return VimClassifier(VimConfig(image_size=56, patch_size=4, d_model=8, depth=24, d_state=4, num_classes=3)).eval()


# -- the card's oracle -------------------------------------------------------------------------
def test_official_counts_and_class_token_in_the_middle():
    """Budget 100 of 196 patches on 24 blocks: points after blocks 5, 10, 15; sequences of 157,
    125, 101 tokens (the code's counts) with the class token at ``len // 2``, bit-exact the class
    token the block before the point returned (at the first point: the unpruned run's)."""
    model = vim_24()
    x = pixels(2, side=56)
    seen, before = {}, {}

    def grab(layer):
        return lambda m, args: seen.setdefault(layer, args[0].clone())

    def output(layer):
        return lambda m, args, out: before.setdefault(layer, out.clone())

    unpruned = model.backbone.layers[5].register_forward_pre_hook(grab("ref"))
    with torch.no_grad():
        model(x)
    unpruned.remove()
    with vlmprune.wrap(model, "top_vim", budget=100) as handle:
        hooks = [model.backbone.layers[k].register_forward_pre_hook(grab(k)) for k in (5, 10, 15)]
        hooks += [model.backbone.layers[k - 1].register_forward_hook(output(k)) for k in (5, 10, 15)]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        assert [str(p["point"]) for p in handle.stats["points"]] == ["mixer:5", "mixer:10", "mixer:15"]
    assert [seen[k].shape[1] for k in (5, 10, 15)] == [157, 125, 101]
    assert torch.equal(seen[5][:, 157 // 2], seen["ref"][:, 98])
    for k in (5, 10, 15):
        assert torch.equal(seen[k][:, seen[k].shape[1] // 2], before[k][:, before[k].shape[1] // 2])


def planted_ctx(out_b: torch.Tensor, budget: int, cls_pos: int = 8) -> TokenContext:
    """A context at ToP-ViM's first point on :func:`tiny_vim` (16 patches, points 1, 2, 3) whose
    ``mixer_backward`` signal is ``out_b [B, 17, C]`` (flipped order)."""
    b, length, c = out_b.shape
    info = VimAdapter(tiny_vim()).info()
    tokens = torch.arange(b * (length - 1) * c, dtype=torch.float).view(b, length - 1, c)
    cls = torch.full((b,), cls_pos)
    signals = Signals({"mixer_backward": lambda: out_b, "cls_position": lambda: cls})
    return TokenContext(tokens=tokens, stage="mixer", layer=1, budget=budget, target=budget, grid=(4, 4),
                        token_index=torch.arange(length - 1).expand(b, -1), signals=signals,
                        cls_token=torch.full((b, c), -7.0), info=info, images=tuple(range(b)))


def test_planted_score_survives_aligned_and_its_mirror_under_code_exact():
    """Sequence position 3 planted at +1e4 in every channel of the backward output (flipped index
    17 - 1 - 3): ToP-ViM keeps patch 3; ``code_exact`` keeps the mirror, position 13 = patch 12."""
    out_b = torch.rand(1, 17, 4, generator=torch.Generator().manual_seed(0)) - 2
    out_b[0, 17 - 1 - 3] = 1e4
    ctx = planted_ctx(out_b, budget=2)
    method = ToPViM()
    method.check(ctx.info)
    keep = method.select(ctx).keep[0].tolist()
    assert 3 in keep and 12 not in keep
    exact = ToPViM(code_exact=True)
    exact.check(ctx.info)
    keep = exact.select(ctx).keep[0].tolist()
    assert 12 in keep and 3 not in keep


def test_clip_ranks_positive_channels():
    """Channels {+5, -100} (position 2) against {+1, +1} (position 5): unclipped sums rank 5 first,
    clipped sums rank 2 first (budget of one patch: count rounding keeps 1 at least)."""
    out_b = torch.full((1, 17, 2), -50.0)
    out_b[0, 16 - 2] = torch.tensor([5.0, -100.0])
    out_b[0, 16 - 5] = torch.tensor([1.0, 1.0])
    ctx = planted_ctx(out_b, budget=1)
    for clip, want in ((False, 5), (True, 2)):
        method = ToPViM(clip=clip)
        method.check(ctx.info)
        assert ToPViM.count(method, ctx) == 1
        assert method.select(ctx).keep[0].tolist() == [want]


def test_code_exact_excludes_the_class_token_in_row_0_only():
    """The class token's score is the highest in both rows: row 0 never keeps it (masked); row 1
    keeps it in a patch slot (one patch fewer, its value duplicated through ``merged``), as the
    released code does; the default never does (it is not among the tokens)."""
    out_b = torch.rand(2, 17, 3, generator=torch.Generator().manual_seed(1))
    out_b[:, 8] = 1e4  # the middle maps to itself under the flip
    ctx = planted_ctx(out_b, budget=4)
    exact = ToPViM(code_exact=True)
    exact.check(ctx.info)
    sel = exact.select(ctx)
    merged = sel.merged
    assert merged is not None and not (merged[0] == -7.0).all(-1).any()
    assert int((merged[1] == -7.0).all(-1).sum()) == 1
    method = ToPViM()
    method.check(ctx.info)
    assert method.select(ctx).merged is None


def test_kept_indices_ascend_and_halves_are_equal():
    """Every ToP-ViM selection ascends, keeps an even count below the full set, and the class token
    then sits with as many kept patches before it as after it."""
    model = tiny_vim()
    x = pixels(3, seed=4)
    with vlmprune.wrap(model, "top_vim", budget=5) as handle, record_selections(handle) as seen, torch.no_grad():
        model(x)
    for point, _, sel in seen:
        keep = sel.keep
        assert bool((keep[:, 1:] > keep[:, :-1]).all()) and keep.shape[1] % 2 == 0, point
    assert handle.adapter.runtime.cls_pos.tolist() == [keep.shape[1] // 2] * 3


@pytest.mark.parametrize("code_exact", [False, True])
def test_manual_equivalence_and_batch(code_exact):
    """ToP-ViM (and its code-exact form, duplicates included) equals the by-hand block loop on the
    recorded selections; the default's batch equals its single runs."""
    model = tiny_vim()
    x = pixels(3, seed=2)
    with vlmprune.wrap(model, "top_vim", budget=4, code_exact=code_exact) as handle:
        with record_selections(handle) as seen:
            pruned = sequence_and_logits(model, x)
        singles = [sequence_and_logits(model, x[i : i + 1])[0] for i in range(3)]
    prunes = {rec[0].layer: [(k, m) for k, m, _ in rec[2].per_image()] for rec in seen}
    torch.testing.assert_close(pruned, run_by_hand(model, x, prunes, "middle"), atol=1e-5, rtol=1e-5)
    if not code_exact:
        for i in range(3):
            torch.testing.assert_close(singles[i], pruned[i], atol=1e-5, rtol=1e-5)


# -- scan order --------------------------------------------------------------------------------
def test_scan_order_matters_and_a_permuted_keep_is_refused():
    """The same kept patches in another order change the output (the scan reads them in
    sequence), and the adapter refuses a keep that does not ascend rather than reorder it."""
    model = tiny_vim()
    x = pixels(1, seed=3)
    keep = torch.tensor([1, 4, 6, 9, 11, 14])
    in_order = run_by_hand(model, x, {2: [(keep, None)]}, "stay")
    permuted = run_by_hand(model, x, {2: [(keep[[3, 0, 1, 2, 4, 5]], None)]}, "stay")
    assert not torch.allclose(in_order, permuted, atol=1e-3)
    with vlmprune.wrap(model, RowKeep(rows=(keep.tolist(),)), budget=6):
        wrapped = sequence_and_logits(model, x)
    torch.testing.assert_close(wrapped, in_order, atol=1e-5, rtol=1e-5)
    permuted_keep = RowKeep(rows=(keep[[3, 0, 1, 2, 4, 5]].tolist(),))
    with vlmprune.wrap(model, permuted_keep, budget=6), pytest.raises(RuntimeError, match="does not ascend at stage 'mixer'"):
        model(x)


# -- the class token ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls_position", [0, 5, 16])
def test_class_token_protected_at_any_position_with_different_rows(cls_position):
    """A class token first, inside or last; rows keeping different patches (so their class tokens
    land at different places): each row equals the by-hand loop and its own single run, and the
    logits read each row's class token."""
    model = tiny_vim(cls_position=cls_position)
    x = pixels(2, seed=5)
    rows = ((0, 1, 2, 3, 4, 5), (10, 11, 12, 13, 14, 15))
    keep = [(torch.tensor(r), None) for r in rows]
    with vlmprune.wrap(model, RowKeep(rows=rows), budget=6) as handle:
        pruned = sequence_and_logits(model, x)
        assert handle.adapter.runtime.cls_pos.tolist() == [min(cls_position, 6), max(0, cls_position - 10)]
    torch.testing.assert_close(pruned, run_by_hand(model, x, {2: keep}, "stay"), atol=1e-5, rtol=1e-5)
    for i in range(2):
        with vlmprune.wrap(model, RowKeep(rows=(rows[i],)), budget=6):
            torch.testing.assert_close(sequence_and_logits(model, x[i : i + 1])[0], pruned[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["uniform", "random", "divprune"])
def test_boundary_methods_at_the_default_point_and_cls_place_middle(method):
    """Boundary methods act at ``mixer:depth // 2``; ``cls_place="middle"`` re-centres the class
    token after ``k // 2`` kept patches (by-hand loop)."""
    model = tiny_vim()
    x = pixels(2, seed=6)
    with vlmprune.wrap(model, method, budget=5, cls_place="middle") as handle, record_selections(handle) as seen:
        pruned = sequence_and_logits(model, x)
    ((point, _, sel),) = seen
    assert str(point) == "mixer:2"
    prunes = {2: [(k, m) for k, m, _ in sel.per_image()]}
    torch.testing.assert_close(pruned, run_by_hand(model, x, prunes, "middle"), atol=1e-5, rtol=1e-5)


# -- unwrap, copies, refusals ------------------------------------------------------------------
def test_unwrap_exact_and_deepcopy():
    model = tiny_vim()
    x = pixels(2, seed=7)
    ref = sequence_and_logits(model, x)
    before = hook_count(model)
    handle = vlmprune.wrap(model, "top_vim", budget=4)
    assert "ssm" in vars(model.backbone.layers[0].mixer)
    twin = copy.deepcopy(model)
    handle.unwrap()
    assert hook_count(model) == before and all("ssm" not in vars(b.mixer) for b in model.backbone.layers)
    assert torch.equal(sequence_and_logits(model, x), ref)
    assert twin._vlmprune_handle is not None and sequence_and_logits(twin, x).shape[1] < ref.shape[1]


def test_refusals_name_the_parameter():
    model = tiny_vim()
    with pytest.raises(ValueError, match="parameter 'boundary_layer' must be an int in \\[1, 4\\]"):
        vlmprune.wrap(model, "uniform", budget=4, boundary_layer=9)
    with pytest.raises(ValueError, match="parameter 'cls_place' must be one of \\['stay', 'middle'\\]"):
        vlmprune.wrap(model, "uniform", budget=4, cls_place="left")
    with pytest.raises(ValueError, match="option 'keep_ratio' of method 'top_vim' must be in \\(0, 1\\]"):
        ToPViM(keep_ratio=1.5)
    with pytest.raises(ValueError, match="method 'top_vim' acts at stage"):
        vlmprune.wrap(tests.cases.VIT.model(), "top_vim", budget=4)
    with pytest.raises(ValueError, match="option 'layers' of method 'top_vim': .* of a 24-layer Vim map to .* on this 4-layer Vim"):
        vlmprune.wrap(model, "top_vim", budget=4, layers=(1, 2, 3, 4, 5, 6))
    with pytest.raises(ValueError, match="method 'visionzip' needs signal\\(s\\) \\['cls_attention', 'encoder_qkv'\\], which the vim adapter cannot provide"):
        vlmprune.wrap(model, "visionzip", budget=4)


# -- alignment="gap_decay" [unverified reading of ToP-ViM's alignment] --------------------------
def test_gap_scan_equals_a_scan_over_input_free_tokens():
    """The gap scan over kept tokens equals mambapy's sequential scan over the sequence with
    ``gap - 1`` input-free tokens (x = 0, the next kept token's dt) put back before each kept token,
    read at the kept tokens."""
    from mambapy.vim import MambaConfig, VMambaBlock
    from vlmprune.adapters.mamba import gap_selective_scan

    torch.manual_seed(0)
    block = VMambaBlock(MambaConfig(d_model=4, n_layers=1, d_state=3))
    g = torch.Generator().manual_seed(1)
    x, delta = torch.randn(2, 5, 8, generator=g), torch.rand(2, 5, 8, generator=g)
    A, D = -torch.rand(8, 3, generator=g), torch.randn(8, generator=g)
    B, C = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    gap = torch.tensor([[1.0, 3, 1, 2, 1], [1, 1, 4, 1, 2]])
    got = gap_selective_scan(x, delta, A, B, C, D, gap)
    for row in range(2):
        idx = torch.repeat_interleave(torch.arange(5), gap[row].long())  # each kept token repeated gap times
        real = torch.cumsum(gap[row].long(), 0) - 1  # where the kept tokens sit in the long sequence
        xs = torch.zeros(1, len(idx), 8)
        xs[0, real] = x[row]
        ref = block.selective_scan_seq(xs, delta[row : row + 1, idx], A, B[row : row + 1, idx], C[row : row + 1, idx], D)
        torch.testing.assert_close(got[row], ref[0, real], atol=1e-5, rtol=1e-5)


def test_gap_decay_tracks_original_positions():
    """Keep-all under gap_decay is the unwrapped model; pruned, each token's input position is
    tracked (class token included) and the output differs from the released code's ('none');
    'state_carry' is refused naming what the adapter offers."""
    model = tiny_vim()
    x = pixels(2, seed=8)
    ref = sequence_and_logits(model, x)
    with vlmprune.wrap(model, "uniform", budget=16, alignment="gap_decay"):
        torch.testing.assert_close(sequence_and_logits(model, x), ref, atol=1e-6, rtol=0)
    rows = ((0, 1, 2, 3, 4, 5), (10, 11, 12, 13, 14, 15))
    with vlmprune.wrap(model, RowKeep(rows=rows, layer=1), budget=6, alignment="gap_decay") as handle:
        aligned = sequence_and_logits(model, x)
        assert handle.adapter.runtime.origin.tolist() == [[0, 1, 2, 3, 4, 5, 8], [8, 11, 12, 13, 14, 15, 16]]
    with vlmprune.wrap(model, RowKeep(rows=rows, layer=1), budget=6):
        plain = sequence_and_logits(model, x)
    assert aligned.shape == plain.shape and not torch.allclose(aligned, plain, atol=1e-4)
    assert all("selective_scan" not in vars(b.mixer) for b in model.backbone.layers)
    with pytest.raises(ValueError, match="parameter 'alignment': the vim adapter offers \\['none', 'gap_decay'\\], not 'state_carry'"):
        vlmprune.wrap(model, "uniform", budget=4, alignment="state_carry")


# -- ToMe on the ordered stage (in-place merges) ------------------------------------------------
def test_tome_merges_two_planted_parallel_patches_first_in_place():
    """Method level: patch 11 (set B) is 3 x patch 4 (set A), so their cosine is 1 and r=1 merges
    4 into 11; with sizes 2 and 3 the merged value is (2 x4 + 3 x11) / 5 in 11's place, every other
    patch keeps its own value and place (keep ascends), the merge map sends both to that slot."""
    from vlmprune.methods.tome import ToMe

    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 16, 6, generator=gen)
    tokens[:, 11] = 3 * tokens[:, 4]
    sizes = torch.ones(2, 16)
    sizes[:, 4], sizes[:, 11] = 2.0, 3.0
    info = VimAdapter(tiny_vim()).info()
    ctx = TokenContext(tokens=tokens, stage="mixer", layer=1, budget=16, target=16, grid=(4, 4),
                       token_index=torch.arange(16).expand(2, -1), info=info, images=(0, 1),
                       signals=Signals({"hidden": lambda: tokens, "sizes": lambda: sizes}))
    sel = ToMe(r=1).select(ctx)
    rest = [p for p in range(16) if p != 4]
    assert sel.keep.tolist() == [rest, rest]
    by_hand = tokens[:, rest].clone()
    by_hand[:, rest.index(11)] = (2 * tokens[:, 4] + 3 * tokens[:, 11]) / 5
    torch.testing.assert_close(sel.merged, by_hand, atol=1e-6, rtol=0)
    expected_map = [rest.index(p) if p != 4 else rest.index(11) for p in range(16)]
    assert sel.merge_map.tolist() == [expected_map, expected_map]


def test_tome_on_the_vim_merges_in_place_and_sizes_accumulate():
    """Model level: block 0's output holds patch 5 = 3 x patch 2 (a hook plants it), so ToMe
    (r=[1, 1]) merges 2 into 5 at mixer:1; the sequence block 1 takes in is the unpruned one
    without patch 2, patch 5's slot holding the mean 2 x patch 2 and the class token where it was;
    the second point's sizes give 5's token the 2 patches it stands for."""
    model = tiny_vim()
    x = pixels(2, seed=1)
    a, b, cls = 2, 5, model.cls_index  # patch indices; both before the class token (8): sequence positions too
    layers = model.backbone.layers

    def plant(module, args, out):
        out = out.clone()
        out[:, b] = 3 * out[:, a]
        return out

    layers[0].register_forward_hook(plant)
    reference, seen_in = [], []
    handle = layers[1].register_forward_pre_hook(lambda m, args: reference.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    with vlmprune.wrap(model, "tome", r=[1, 1]) as wrapped, record_selections(wrapped) as seen, torch.no_grad():
        layers[1].register_forward_pre_hook(lambda m, args: seen_in.append(args[0]))
        model(x)
        sizes = wrapped.adapter.runtime.sizes
    full = reference[0]
    by_hand = torch.cat([full[:, :a], full[:, a + 1 :]], 1).clone()
    by_hand[:, b - 1] = 2 * full[:, a]
    torch.testing.assert_close(seen_in[0], by_hand, atol=1e-6, rtol=1e-6)
    assert torch.equal(seen_in[0][:, cls - 1], full[:, cls])
    before = torch.ones(2, 15)
    before[:, b - 1] = 2.0  # after mixer:1, patch 5's slot stands for 2 patches
    second = list(seen)[1][2].merge_map
    assert torch.equal(sizes, torch.zeros(2, 14).scatter_add_(1, second, before))
    assert wrapped.stats["points"][0] == {"point": "mixer:1", "in": [16, 16], "out": [15, 15]}


def test_tome_on_the_vim_keeps_scan_order_and_never_merges_the_class_token():
    """r=3 on 4 blocks: every point's keep ascends, the class token comes out bit-exact where
    ``cls_place='stay'`` puts it, and ``prop_attn`` is no refusal (a Vim has no attention)."""
    model = tiny_vim(cls_position=3)
    with vlmprune.wrap(model, "tome", r=3, prop_attn=True) as handle, record_selections(handle) as seen, torch.no_grad():
        model(pixels(2, seed=2))
    assert [rec[0].layer for rec in seen] == [1, 2, 3, 4]
    assert [p["out"] for p in handle.stats["points"]] == [[13, 13], [10, 10], [7, 7], [4, 4]]
    for rec in seen:
        assert bool((rec[2].keep[:, 1:] > rec[2].keep[:, :-1]).all())
