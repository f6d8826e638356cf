"""ToMeSD (vlmprune/methods/tomesd.py) against the ``tomesd`` package, the outside reference: the
same UNet with the same settings gives the same outputs, its partition and unmerge are the
package's, and ``remove_patch`` and ``unwrap`` both restore exactly. CPU, no network."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
tomesd = pytest.importorskip("tomesd")

import vlmprune  # noqa: E402
from tests.cases import UNET  # noqa: E402  (imports tests.cases_unet after PixelCase)
from tests.cases_unet import unet_inputs  # noqa: E402
from vlmprune.context import Selection  # noqa: E402
from vlmprune.primitives.merging import bipartite_soft_matching  # noqa: E402
from vlmprune.primitives.stride_partition import stride_partition  # noqa: E402
from vlmprune.reduction import Reduction  # noqa: E402

SETTINGS = [
    {"use_rand": False},
    {"use_rand": False, "merge_crossattn": True, "merge_mlp": True},
    {"use_rand": False, "ratio": 0.3, "max_downsample": 2, "sx": 4, "sy": 2},
    {"use_rand": True},
    {"use_rand": True, "ratio": 0.7, "merge_mlp": True},
]


def steps(unet, inputs, n: int = 2) -> list[torch.Tensor]:
    with torch.no_grad():
        # positional sample: tomesd's pre-hook reads it from the positional arguments
        return [unet(inputs["sample"], torch.tensor(900 - 300 * i), encoder_hidden_states=inputs["encoder_hidden_states"]).sample
                for i in range(n)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_equals_the_tomesd_package(settings):
    """Two denoising steps on a guidance-sized batch: the package's outputs and ours agree to
    1e-5 (means of three or more merged tokens may differ in the last bit); with ``use_rand`` the
    package's generator is the global RNG forked at its first merge, ours is made from ``seed``:
    both draw alike after ``torch.manual_seed(seed)``. Both restore the UNet exactly."""
    unet, inputs = UNET.model(), unet_inputs(2, 7)
    full = steps(unet, inputs)
    torch.manual_seed(11)
    tomesd.apply_patch(unet, **settings)
    try:
        reference = steps(unet, inputs)
    finally:
        tomesd.remove_patch(unet)
    assert all(torch.equal(a, b) for a, b in zip(steps(unet, inputs), full))
    with vlmprune.wrap(unet, "tomesd", seed=11, **settings):
        ours = steps(unet, inputs)
    for a, b, f in zip(ours, reference, full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert float((a - f).abs().max()) > 1e-3  # merging changed the outputs
    assert all(torch.equal(a, b) for a, b in zip(steps(unet, inputs), full))


@pytest.mark.parametrize("use_rand", [False, True])
def test_partition_merge_and_unmerge_are_the_packages(use_rand):
    """The stride partition and matching on a random 16 x 16 metric: our merged values equal the
    package's merge (1e-6), our restore equals its unmerge bit for bit (a copy)."""
    from tomesd.merge import bipartite_soft_matching_random2d

    metric = torch.randn(2, 256, 8, generator=torch.Generator().manual_seed(0))
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    m, u = bipartite_soft_matching_random2d(metric, 16, 16, 2, 2, 100, no_rand=not use_rand, generator=gen_a)
    sets = stride_partition(16, 16, 2, 2, gen_b if use_rand else None)
    merge, provenance, keep = bipartite_soft_matching(metric, 100, sort_unmerged=False, sets=sets)
    x = torch.randn(2, 256, 4)
    torch.testing.assert_close(merge(x)[0], m(x), atol=1e-6, rtol=0)
    y = torch.randn(2, 156, 4)
    assert torch.equal(Reduction(Selection(keep=keep, merge_map=provenance), 256).restore(y), u(y))


def test_partition_one_destination_per_window_and_border_sources():
    """A 5 x 7 grid with 2 x 2 windows: 2 x 3 windows, one destination each (top-left without a
    generator), the last row and column sources."""
    src, dst = stride_partition(5, 7, 2, 2)
    assert sorted(dst.tolist()) == [r * 7 + c for r in (0, 2) for c in (0, 2, 4)]
    assert sorted(src.tolist() + dst.tolist()) == list(range(35))
    src, dst = stride_partition(5, 7, 2, 2, torch.Generator().manual_seed(0))
    windows = sorted(((d // 7) // 2, (d % 7) // 2) for d in dst.tolist())
    assert windows == [(r, c) for r in range(2) for c in range(3)] and all(d // 7 < 4 and d % 7 < 6 for d in dst.tolist())
    with pytest.raises(ValueError, match="parameters 'sx' and 'sy'"):
        stride_partition(4, 4, 0, 2)


def test_odd_batch_turns_random_destinations_off():
    """As tomesd does: a batch of odd size takes the top-left destinations even with use_rand."""
    unet, inputs = UNET.model(), unet_inputs(1, 2)
    picks = []
    for use_rand in (True, False):
        with vlmprune.wrap(unet, "tomesd", use_rand=use_rand) as handle, handle.record() as records:
            steps(unet, inputs, 1)
        picks.append([rec.selection.keep for rec in records])
    assert all(torch.equal(a, b) for a, b in zip(*picks))
