"""The diffusion-UNet adapter (adapters/unet.py) on a tiny diffusers UNet2DConditionModel: stages,
points, per-step and per-block ratios, a DDIM sampling loop with classifier-free guidance run
wrapped, merge-then-restore, refusals. CPU, no network."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import vlmprune  # noqa: E402
from tests.cases import UNET  # noqa: E402  (imports tests.cases_unet after PixelCase)
from tests.cases_unet import unet_inputs  # noqa: E402
from vlmprune.adapters.unet import UNetAdapter, group_mean  # noqa: E402
from vlmprune.reduction import Reduction  # noqa: E402


def ddim_loop(unet, steps: int = 10, guidance: float = 7.5, seed: int = 0) -> torch.Tensor:
    """A DDIM sampling loop by hand (no pipeline): classifier-free guidance as one batch of the
    unconditional and conditional halves per step."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 16, 16, generator=gen)
    text = torch.cat([torch.zeros(1, 7, 32), torch.randn(1, 7, 32, generator=gen)])
    with torch.no_grad():
        for t in scheduler.timesteps:
            noise = unet(torch.cat([latents] * 2), t, encoder_hidden_states=text).sample
            uncond, cond = noise.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return latents


def test_stages_downsampling_and_default_points():
    info = UNetAdapter(UNET.model()).info()
    assert {name: (spec.role, spec.restore, list(spec.layers)) for name, spec in info.stages.items()} == {
        "unet.down.0": ("inside", "exit", [0]), "unet.mid": ("inside", "exit", [0]), "unet.up.1": ("inside", "exit", [0, 1])}
    assert info.downsample == {"unet.down.0": 1, "unet.mid": 2, "unet.up.1": 1}
    assert str(info.default_points["boundary"]) == "unet.down.0:0"
    with vlmprune.wrap(UNET.model(), "tomesd") as handle:
        assert [str(p) for p in handle._plan.points] == ["unet.down.0:0", "unet.up.1:0", "unet.up.1:1"]
    with vlmprune.wrap(UNET.model(), "tomesd", max_downsample=2) as handle:
        assert [str(p) for p in handle._plan.points] == ["unet.down.0:0", "unet.mid:0", "unet.up.1:0", "unet.up.1:1"]


_FULL: dict = {}


@pytest.mark.parametrize("method", ["tomesd", "optiprune"])
def test_ddim_loop_with_guidance_runs_wrapped(method):
    """ToMeSD and OptiPrune at ratio 0.5 inside a 10-step DDIM loop: every step reduces each
    16 x 16 block's 256 tokens to 128 in both guidance halves, the steps are counted, and the
    samples differ from the full model's."""
    unet = UNET.model()
    if "full" not in _FULL:
        _FULL["full"] = ddim_loop(unet)
    full = _FULL["full"]
    with vlmprune.wrap(unet, method, ratio=0.5) as handle, handle.record() as records:
        pruned = ddim_loop(unet)
        assert handle._plan.session.steps == 10
        assert handle.stats["points"] == [{"point": p, "in": [256, 256], "out": [128, 128]}
                                          for p in ("unet.down.0:0", "unet.up.1:0", "unet.up.1:1")]
    assert len(records) == 30 and torch.isfinite(pruned).all()
    assert 0 < float((pruned - full).abs().max()) < float(full.abs().max())


def test_per_step_and_per_block_ratios():
    """``ratio`` as a function of the denoising step (``ctx.step``) and as a dict of blocks."""
    unet, inputs = UNET.model(), unet_inputs(2, 0)
    with vlmprune.wrap(unet, "tomesd", ratio=lambda step: 0.5 if step < 2 else 0.25, use_rand=False) as handle, handle.record() as records:
        for _ in range(3):
            UNET.forward(unet, inputs)
        handle.reset()
        UNET.forward(unet, inputs)
    assert [rec.selection.keep.shape[1] for rec in records] == [128] * 6 + [192] * 3 + [128] * 3
    with vlmprune.wrap(unet, "optiprune", ratio={"unet.down.0": 0.5, "unet.up.1:1": 0.25}) as handle:
        UNET.forward(unet, inputs)
        assert [(p["point"], p["out"]) for p in handle.stats["points"]] == [("unet.down.0:0", [128, 128]), ("unet.up.1:1", [192, 192])]


def test_guidance_halves_share_one_random_partition():
    """With random destinations, one draw per block call serves every row (tomesd: the cond and
    uncond halves of a guidance batch share the partition); the matching is each row's own."""
    unet, inputs = UNET.model(), unet_inputs(2, 3)
    with vlmprune.wrap(unet, "tomesd", ratio=0.5) as handle, handle.record() as records:
        UNET.forward(unet, inputs)
    for rec in records:
        destinations = rec.selection.keep[:, -64:]  # [unmerged sources, the 64 destinations]
        assert torch.equal(destinations[0], destinations[1])
        assert not torch.equal(rec.selection.keep[0], rec.selection.keep[1])
        top_left = torch.arange(0, 256, 2).view(8, 2, 8)[:, 0].flatten()
        assert not torch.equal(destinations[0].sort().values, top_left)


def test_merge_then_restore_is_identity_where_nothing_merged():
    """A branch input reduced as the adapter reduces it (group means over ToMeSD's merge map) and
    restored by copy comes back bit for bit at every token whose group is itself alone, and as
    its group's mean elsewhere."""
    unet, inputs = UNET.model(), unet_inputs(2, 1)
    with vlmprune.wrap(unet, "tomesd", ratio=0.5, use_rand=False) as handle, handle.record() as records:
        UNET.forward(unet, inputs)
    sel = records[0].selection
    x = torch.randn(2, 256, 32)
    restored = Reduction(sel, 256).restore(group_mean(x, sel.merge_map, 128))
    sizes = torch.zeros(2, 128).scatter_add_(1, sel.merge_map, torch.ones(2, 256)).gather(1, sel.merge_map)
    alone = sizes == 1
    assert torch.equal(restored[alone], x[alone]) and int(alone.sum()) > 0 and int((~alone).sum()) > 0
    for i in range(2):
        for j in torch.nonzero(~alone[i]).flatten()[:10]:
            group = sel.merge_map[i] == sel.merge_map[i, j]
            torch.testing.assert_close(restored[i, j], x[i][group].mean(0), atol=1e-6, rtol=0)


def test_refusals_name_the_parameter():
    unet = UNET.model()
    with pytest.raises(ValueError, match="option 'ratio' of method 'tomesd' must be a number in \\[0, 1\\)"):
        vlmprune.wrap(unet, "tomesd", ratio=1.0)
    with pytest.raises(ValueError, match="names blocks \\['unet.down.7'\\]; valid choices"):
        vlmprune.wrap(unet, "optiprune", ratio={"unet.down.7": 0.5})
    with pytest.raises(ValueError, match="leaves no transformer block to act in: this UNet's blocks are \\{'unet.down.0': 1"):
        vlmprune.wrap(unet, "tomesd", ratio={"unet.mid": 0.5})  # the mid block is 2 times smaller: max_downsample=2
    with pytest.raises(ValueError, match="at least one of merge_attn, merge_crossattn, merge_mlp"):
        vlmprune.wrap(unet, "tomesd", merge_attn=False)
    block = unet.up_blocks[1].attentions[1].transformer_blocks[0]
    block.set_chunk_feed_forward(1, 1)
    try:
        with pytest.raises(ValueError, match="runs in chunks"):
            vlmprune.wrap(unet, "tomesd", merge_mlp=True)
    finally:
        block.set_chunk_feed_forward(None, 0)
    assert not hasattr(unet, "_vlmprune_handle")
