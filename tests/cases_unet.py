"""The conformance kit's diffusion-UNet case (adapters/unet.py): :class:`UNetCase`, hooked into
tests/cases.py ``CASES``; :func:`tiny_unet`, and :func:`by_hand`, the unwrapped UNet with the
recorded selections applied to its transformer blocks' branches by plain indexing, the manual
oracle's reference."""

from __future__ import annotations

import contextlib

import torch

from tests.cases import PixelCase


def tiny_unet(seed: int = 0):
    """A random diffusers ``UNet2DConditionModel``: 16 x 16 latents of 4 channels, block channels
    (32, 64), one cross-attention block each way (transformer blocks: ``unet.down.0`` 1 and
    ``unet.up.1`` 2 at 16 x 16, ``unet.mid`` 1 at 8 x 8), text width 32."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def unet_inputs(n: int, seed: int, timestep: int = 10) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(n, 4, 16, 16, generator=gen),
        "timestep": torch.tensor(timestep),
        "encoder_hidden_states": torch.randn(n, 7, 32, generator=gen),
    }


@contextlib.contextmanager
def by_hand(model, records, branches):
    """While open, the (unwrapped) ``model``'s transformer blocks at the recorded points run each
    branch in ``branches`` on the recorded selection's tokens, row by row with plain indexing: the
    kept tokens (with ``merged`` values in the record: the mean of each kept token's group of the
    branch input), and every token gets its kept token's output back (``merge_map``; without
    one, a dropped token gets zeros). ``records``: ``(point, selection)`` in call order."""
    from vlmprune.adapters.unet import unet_blocks

    blocks = unet_blocks(model)
    queue = {}
    for point, sel in records:
        queue.setdefault(point, []).append(sel)
    handles, current = [], {}

    def reduce(point):
        def hook(module, args, kwargs):
            sel = current[point]
            x = args[0] if args else kwargs["hidden_states"]
            rows = []
            for i in range(x.shape[0]):
                keep = sel.keep[i]
                if sel.merged is None:
                    rows.append(x[i, keep])
                else:
                    rows.append(torch.stack([x[i][sel.merge_map[i] == s].mean(0) for s in range(keep.shape[0])]))
            x = torch.stack(rows)
            return ((x, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": x})

        return hook

    def restore(point):
        def hook(module, args, kwargs, out):
            sel = current[point]
            rows = []
            for i in range(out.shape[0]):
                if sel.merge_map is not None:
                    rows.append(out[i, sel.merge_map[i]])
                else:
                    row = out.new_zeros(n_tokens[point], out.shape[-1])
                    row[sel.keep[i]] = out[i]
                    rows.append(row)
            return torch.stack(rows)

        return hook

    n_tokens = {}

    def entering(point):
        def hook(module, args):
            current[point] = queue[point].pop(0)
            n_tokens[point] = args[0].shape[1]

        return hook

    try:
        for point in queue:
            block = blocks[point.stage][point.layer]
            handles.append(block.register_forward_pre_hook(entering(point)))
            for name in branches:
                branch = getattr(block, name)
                handles.append(branch.register_forward_pre_hook(reduce(point), with_kwargs=True))
                handles.append(branch.register_forward_hook(restore(point), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


class UNetCase(PixelCase):
    """A diffusers ``UNet2DConditionModel`` (:func:`tiny_unet`); one call is one denoising step
    (:func:`unet_inputs`: latents, timestep 10, text states); the output is the noise prediction,
    one value per latent element (dense: unwrap changes values, not shape). ToMeSD and OptiPrune
    run at ratio 0.5 (0 for keep-all) without random destinations (``use_rand=False``, their
    deterministic option; the random path is tested in tests/test_tomesd.py and
    tests/test_optiprune.py); boundary methods act at ``unet.down.0:0``."""

    id = family = "unet"
    N = 256
    full_budget = 1.0
    full_counts = [N, N]
    budget = unwrap_budget = 0.25
    has_generate = False
    dense_output = True
    #: the methods that act on a UNet: ToMeSD, OptiPrune and boundary methods reading the tokens only
    served = frozenset({"tomesd", "optiprune", "uniform", "random", "divprune"})

    def build(self):
        return tiny_unet()

    def inputs(self, n, seed):
        return unet_inputs(n, seed)

    def single(self, inputs, i, seed):
        return {**inputs, "sample": inputs["sample"][i : i + 1], "encoder_hidden_states": inputs["encoder_hidden_states"][i : i + 1]}

    def assert_batch_equals_single(self, model, inputs, seed):
        batched = self.forward(model, inputs)
        for i in range(inputs["sample"].shape[0]):
            torch.testing.assert_close(self.forward(model, self.single(inputs, i, seed))[0], batched[i], atol=1e-5, rtol=1e-5)

    def forward(self, model, inputs):
        with torch.no_grad():
            return model(**inputs).sample.flatten(1)

    def visual_counts(self, handle):
        """Tokens per row after the last point (none ran: every token)."""
        points = handle.stats["points"]
        return list(points[-1]["out"]) if points else self.full_counts

    def assert_unpatched(self, model):
        assert not hasattr(model, "_vlmprune_handle")
        assert all("get_attention_scores" not in vars(m) for m in model.modules())

    def restriction(self, row, oracle):
        from tests.cases import EXPECT

        if oracle == "cache":
            return "a diffusion UNet has no generate() and no cache"
        if EXPECT[row].method not in self.served:
            return (
                "acts on a UNet only through signals it lacks (attention rows, a projector, text, an LLM) or at stages it "
                "does not have; the UNet serves ToMeSD, OptiPrune, uniform, random and DivPrune"
            )
        return super().restriction(row, oracle)

    def manual(self, model, inputs, handle, seen, pruned):
        """:func:`by_hand` with the recorded selections on the branches the method reduces."""
        branches = getattr(handle.method, "branches", ("attn1",))
        with by_hand(model, [(rec[0], rec[2]) for rec in seen], branches):
            ref = self.forward(model, inputs)
        torch.testing.assert_close(pruned, ref, atol=1e-5, rtol=1e-5)
