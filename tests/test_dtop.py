"""DToP (vlmprune/methods/dtop.py): the card's oracles on planted auxiliary heads, its refusals, and
the ViT adapter mechanics it needs: rows of different lengths padded and masked out of attention,
every patch back before a dense head. The kit (tests/test_conformance.py, case ``vit-dense``) runs
keep-all (p0 = 1), batch, manual (a per-image replay), determinism and unwrap."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import vlmprune
from vlmprune.context import Selection
from vlmprune.method import Method
from vlmprune.methods.dtop import ExitHeads

from .cases import VIT, DenseCase, TimmCase

pytest.importorskip("timm")
DENSE = DenseCase()


class Planted(torch.nn.Module):
    """An auxiliary head whose logits are fixed per patch (raster order), whatever the tokens."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits  # [16, 4]

    def forward(self, tokens):
        return self.logits[: tokens.shape[1]].expand(tokens.shape[0], -1, -1)


def test_every_token_confident_in_one_class_leaves_all_but_the_top_k():
    """Card oracle 2: every token's top probability is above p0 and all are class 2, so exactly
    min(k, N) stay after the stage: the k most confident."""
    logits = torch.zeros(16, 4)
    logits[:, 2] = torch.linspace(5.0, 8.0, 16)  # softmax top > 0.98 everywhere, rising with the index
    model, pixels = DENSE.model(), DENSE.inputs(2, seed=0)["pixel_values"]
    with vlmprune.wrap(model, "dtop", weights={0: Planted(logits)}, blocks=(0,), keep_per_class=5) as handle, \
            handle.record() as seen, torch.no_grad():
        model(pixels)
    assert handle.stats["points"] == [{"point": "vit:1", "in": [16, 16], "out": [5, 5]}]
    assert [k.tolist() for k in seen[0].selection.keep] == [[11, 12, 13, 14, 15]] * 2


def test_finished_set_grows_and_exit_predictions_are_final():
    """Card oracles 3 and 4: the active count never grows from stage to stage; a token finished at
    stage s keeps the logits of stage s's head in the final map (the model's head never overrides
    it), a token still active at the end has the model's own head's logits."""
    first = torch.zeros(16, 4)
    first[:8, 1] = 6.0  # patches 0..7 confident (class 1): 7 leave, 1 stays (k = 1)
    second = torch.zeros(16, 4)
    second[:, 3] = 6.0  # every active token confident (class 3) at the second stage: 1 stays
    model, pixels = DENSE.model(), DENSE.inputs(1, seed=0)["pixel_values"]
    with torch.no_grad():
        ref = model(pixels)
    heads = {0: Planted(first), 1: Planted(second)}
    with vlmprune.wrap(model, "dtop", weights=heads, blocks=(0, 1), keep_per_class=1) as handle, \
            handle.record() as seen, torch.no_grad():
        out = model(pixels)[0].flatten(1).T  # [16, 4] per patch, raster order
    counts = [p["out"][0] for p in handle.stats["points"]]
    assert counts == [9, 1] and counts[0] >= counts[1]
    kept_first = seen[0].token_index[0][seen[0].selection.keep[0]].tolist()
    left_first = sorted(set(range(8)) - set(kept_first))
    assert len(left_first) == 7
    torch.testing.assert_close(out[left_first], first[left_first])  # frozen at the first stage
    still = seen[1].token_index[0][seen[1].selection.keep[0]].tolist()
    left_second = sorted(set(kept_first) - set(still))
    # the second head's planted logits for patch t are second[t's position among the active tokens]
    positions = {t: j for j, t in enumerate(kept_first)}
    torch.testing.assert_close(out[left_second], second[[positions[t] for t in left_second]])
    assert not torch.allclose(out[still], ref[0].flatten(1).T[still])  # pruning changed its context
    assert out[still].abs().sum() > 0 and not torch.equal(out[still], second[[positions[t] for t in still]])


def test_threshold_one_is_the_unpruned_model_bit_for_bit():
    """Card oracle 1 (the kit checks it at atol 1e-5): with p0 = 1 no token exits."""
    model, pixels = DENSE.model(), DENSE.inputs(3, seed=1)["pixel_values"]
    with torch.no_grad():
        ref = model(pixels)
        with vlmprune.wrap(model, "dtop", weights=ExitHeads((0, 1), 32, 4), blocks=(0, 1), threshold=1.0):
            out = model(pixels)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"threshold": 0.0}, ValueError, "option 'threshold' of method 'dtop' must be in \\(0, 1\\]"),
        ({"blocks": (1, 0)}, ValueError, "option 'blocks' of method 'dtop' must be increasing"),
        ({"blocks": (2,), "weights": ExitHeads((2,), 32, 4)}, ValueError, "blocks must lie in \\[0, 1\\]"),
        ({"weights": {5: Planted(torch.zeros(16, 4))}}, ValueError, "no auxiliary head for block\\(s\\) \\[0, 1\\]"),
        ({"weights": 3}, TypeError, "parameter 'weights' of method 'dtop' must be"),
        ({"budget": 4}, TypeError, "parameter 'budget' does not apply to method 'dtop'"),
    ],
)
def test_bad_options_are_refused(options, error, match):
    options = {"weights": ExitHeads((0, 1), 32, 4), "blocks": (0, 1), **options}
    with pytest.raises(error, match=match):
        vlmprune.wrap(DENSE.model(), "dtop", **options)


def test_a_model_without_a_dense_head_or_heads_is_refused():
    with pytest.raises(ValueError, match="needs a ViT with a dense"):
        vlmprune.wrap(VIT.model(), "dtop", weights=ExitHeads((0, 1), 32, 4), blocks=(0, 1))
    with pytest.raises(ValueError, match="method 'dtop' needs auxiliary heads"):
        vlmprune.wrap(DENSE.model(), "dtop", blocks=(0, 1))


# -- rows of different lengths on a plain ViT -------------------------------------------------------
@dataclass
class FirstK(Method):
    """At ``vit:1`` keeps the first 2, 5 or 8 patches of an image, read off its first token (so a
    row's count is its own, alone or in a batch); at ``vit:2`` all but the last."""

    name = "first_k_test"
    roles = ("inside",)
    needs = frozenset({"hidden"})

    def points(self, info):
        from vlmprune.context import Point

        return [Point("vit", 1), Point("vit", 2)]

    @staticmethod
    def count(tokens: torch.Tensor) -> int:
        return 2 + 3 * (int(tokens[0, 0].abs() * 1e4) % 3)

    def select(self, ctx):
        if ctx.layer == 1:
            return Selection(keep=[torch.arange(self.count(t)) for t in ctx.tokens])
        return Selection(keep=[torch.arange(ctx.tokens.shape[1] - 1)] * ctx.tokens.shape[0])


def test_rows_of_different_lengths_are_padded_and_masked_out():
    """A CLS-pooled timm ViT (CLS + 2 registers): the batch (padded to the longest row, padding
    masked out of attention) equals each image alone, through both points."""
    case = TimmCase("token")
    model = case.model()
    pixels = case.inputs(6, seed=3)["pixel_values"]
    with vlmprune.wrap(model, FirstK(), budget=1.0) as handle, torch.no_grad():
        batch = model(pixels)
        first, second = handle.stats["points"]
        alone = torch.cat([model(pixels[i : i + 1]) for i in range(6)])
    assert len(set(first["out"])) > 1 and second["out"] == [k - 1 for k in first["out"]]
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)


def test_rows_of_different_lengths_under_mean_pooling_are_refused():
    model, pixels = TimmCase("avg").model(), TimmCase("avg").inputs(6, seed=3)["pixel_values"]
    with vlmprune.wrap(model, FirstK(), budget=1.0), pytest.raises(RuntimeError, match="pools the mean of its tokens"):
        model(pixels)
