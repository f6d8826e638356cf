"""OptiPrune (vlmprune/methods/optiprune.py): SimPrune's copy recovery and choice of pruned tokens,
its randomness across denoising steps, LatentMapper's scores (the card's oracles) and its
optimisation (a planted map; pruned forwards of a wrapped tiny UNet). CPU, no network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

import vlmprune  # noqa: E402
from tests.cases import UNET  # noqa: E402  (imports tests.cases_unet after PixelCase)
from tests.cases_unet import unet_inputs  # noqa: E402
from vlmprune.methods.optiprune import LatentMapper, subject_entanglement, subject_neglect  # noqa: E402
from vlmprune.primitives.stride_partition import stride_partition  # noqa: E402


@pytest.mark.parametrize("use_rand", [False, True])
def test_simprune_copy_recovery(use_rand):
    """Self-attention of the first 16 x 16 block under SimPrune (ratio 0.5): each pruned token's
    output is bit for bit its matched kept token's, the kept tokens' outputs are the attention of
    the kept subset, the kept tokens ascend, and the pruned ones are the sources best matched to a
    destination (cosine of the block input)."""
    unet, inputs = UNET.model(), unet_inputs(2, 4)
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    seen = {}
    before = [block.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
              block.attn1.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("in", a[0]), with_kwargs=True)]
    try:
        with vlmprune.wrap(unet, "optiprune", ratio=0.5, use_rand=use_rand) as handle, handle.record() as records:
            after = block.attn1.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
            UNET.forward(unet, inputs)
            after.remove()
        sel = records[0].selection
        keep, merge_map, out = sel.keep, sel.merge_map, seen["out"]
        assert sel.merged is None and keep.shape == (2, 128) and bool((keep[:, 1:] > keep[:, :-1]).all())
        with torch.no_grad():
            kept_out = block.attn1(seen["in"].gather(1, keep[..., None].expand(-1, -1, 32)))
        src, dst = stride_partition(16, 16, 2, 2, torch.Generator().manual_seed(0) if use_rand else None)
        for i in range(2):
            torch.testing.assert_close(out[i, keep[i]], kept_out[i], atol=1e-6, rtol=0)
            assert torch.equal(out[i], out[i, keep[i, merge_map[i]]])
            x = F.normalize(seen["x"][i], dim=-1)
            score, match = (x[src] @ x[dst].T).max(1)
            pruned = src[score.topk(128).indices]
            assert set(pruned.tolist()) == set(range(256)) - set(keep[i].tolist())
            assert torch.equal(keep[i, merge_map[i, pruned]], dst[match[score.topk(128).indices]])
    finally:
        for h in before:
            h.remove()



def test_simprune_at_ratio_zero_is_the_identity():
    unet, inputs = UNET.model(), unet_inputs(2, 5)
    full = UNET.forward(unet, inputs)
    with vlmprune.wrap(unet, "optiprune", ratio=0.0, merge_crossattn=True, merge_mlp=True):
        assert torch.equal(UNET.forward(unet, inputs), full)


def test_random_destinations_change_with_the_step_and_repeat_after_reset():
    """One draw per block call from the session's generator (seeded by ``seed``): step 1 prunes
    other tokens than step 0 on the same input; after ``handle.reset()`` step 0's choice comes
    back; another seed chooses otherwise."""
    unet, inputs = UNET.model(), unet_inputs(2, 6)
    with vlmprune.wrap(unet, "optiprune", ratio=0.5) as handle, handle.record() as records:
        UNET.forward(unet, inputs)
        UNET.forward(unet, inputs)
        handle.reset()
        UNET.forward(unet, inputs)
    keeps = [rec.selection.keep for rec in records[::3]]
    assert not torch.equal(keeps[0], keeps[1]) and torch.equal(keeps[0], keeps[2])
    with vlmprune.wrap(unet, "optiprune", ratio=0.5, seed=1) as handle, handle.record() as records:
        UNET.forward(unet, inputs)
    assert not torch.equal(records[0].selection.keep, keeps[0])


def test_scores_on_the_cards_oracles():
    """S_cross is 0 when every subject map peaks at 1 and 1 when one is all zeros; the overlap f
    of two subjects is 0.5 for identical self-attention rows and 0 for disjoint ones."""
    cross = torch.zeros(1, 4, 3)
    cross[0, 1, 1] = cross[0, 2, 2] = 1.0
    assert subject_neglect(cross, [1, 2]).item() == 0.0
    cross[0, 2, 2] = 0.0
    assert subject_neglect(cross, [1, 2]).item() == 1.0
    cross[0, 2, 2] = 1.0
    self_maps = torch.zeros(1, 4, 4)
    self_maps[0, 1] = self_maps[0, 2] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert subject_entanglement(cross, self_maps, [1, 2]).item() == pytest.approx(0.5)
    self_maps[0, 1] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    self_maps[0, 2] = torch.tensor([0.0, 0.0, 0.5, 0.5])
    assert subject_entanglement(cross, self_maps, [1, 2]).item() == 0.0
    assert subject_entanglement(cross, self_maps, [1]).item() == 0.0


def test_latent_mapper_objective_decreases_on_a_planted_map():
    """A planted differentiable map: subject 1's cross map is the softmax over text of the noise's
    logits (subject 1 planted weak), self-attention rows are fixed. The objective decreases
    step by step until the noise is valid (S_cross below its threshold), well before the
    iteration budget, and the noise stays near the prior."""
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(1, 16, 3, generator=gen)
    bias = torch.tensor([0.0, -4.0, 0.0])
    self_maps = torch.softmax(torch.randn(1, 16, 16, generator=gen), -1)

    def maps(z):
        return torch.softmax(z + bias, -1), self_maps

    mapper = LatentMapper(subjects=(1,), iterations=200, lr=0.1, kl_weight=0.01)
    z, history = mapper.optimise(maps, eps)
    assert history[0] > 0.9 and len(history) < 200
    assert all(b < a for a, b in zip(history, history[1:]))
    assert subject_neglect(maps(z)[0], [1]).item() < mapper.cross_threshold
    assert float((z - eps).abs().max()) < 6


def test_latent_mapper_runs_pruned_forwards_and_leaves_the_unet_as_it_was():
    """On a UNet wrapped with optiprune: the mapper's forwards are pruned (SimPrune ran at each
    of them), its objective at the returned noise is below the start, the attention processors
    are the UNet's own again, and the session is reset for sampling."""
    unet, inputs = UNET.model(), unet_inputs(1, 8, timestep=999)
    processors = dict(unet.attn_processors)
    with vlmprune.wrap(unet, "optiprune", ratio=0.5) as handle, handle.record() as records:
        mapper = LatentMapper(subjects=(2, 4), iterations=4, lr=0.1)
        z, history = mapper.map(unet, inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
        assert handle._plan.session.steps == 0
    assert len(records) == 3 * len(history) and all(rec.selection.keep.shape[1] == 128 for rec in records)
    assert z.shape == inputs["sample"].shape and min(history) < history[0]
    assert all(unet.attn_processors[name] is proc for name, proc in processors.items())
    assert all("get_attention_scores" not in vars(m) for m in unet.modules())


def test_latent_mapper_refuses_bad_subjects():
    with pytest.raises(ValueError, match="parameter 'subjects'"):
        LatentMapper(subjects=(0,))


def test_recovered_self_attention_keeps_each_row_a_distribution():
    """A self-attention map over SimPrune's kept tokens, brought back to the full grid as
    LatentMapper reads it: a pruned query's row is its kept token's, and each kept key's mass is
    spread evenly over the tokens it stands for, so every row still sums to 1."""
    from vlmprune.methods.optiprune import _recovered
    from vlmprune.reduction import Reduction

    unet, inputs = UNET.model(), unet_inputs(1, 9)
    with vlmprune.wrap(unet, "optiprune", ratio=0.5) as handle, handle.record() as records:
        UNET.forward(unet, inputs)
    sel = records[0].selection
    probs = torch.softmax(torch.randn(1, 128, 128), -1)
    full = _recovered(probs, Reduction(sel, 256), columns=True)
    torch.testing.assert_close(full.sum(-1), torch.ones(1, 256))
    assert torch.equal(full[0], full[0, sel.keep[0, sel.merge_map[0]]])
    stands_for = torch.bincount(sel.merge_map[0], minlength=128).float()
    torch.testing.assert_close(full[0, sel.keep[0]][:, sel.keep[0]], probs[0] / stands_for)
