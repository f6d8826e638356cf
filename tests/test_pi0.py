"""The PI0 adapter (adapters/pi0.py) beyond the kit's oracles (tests/cases_pi0.py): several cameras
per prompt, the action expert's positions, masks and cache per layer, and the episode's history
of the action queries' attention (VLA-Pruner's temporal signal on PI0)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from vlmprune.adapters.vla import HISTORY_KEY

import tests.cases  # noqa: F401  (the kit first: tests/cases_pi0.py imports from it)
import vlmprune
from tests.cases_pi0 import (
    CHUNK,
    IMAGE,
    N,
    PI0Case,
    masked_actions,
    pi0_batch,
    row_of,
    tiny_pi0,
)
from vlmprune.context import Selection
from vlmprune.wrap import Handle

CASE = PI0Case()
CAMERAS = [2, 1]  # row 0: two cameras; row 1: one, its second camera slot padding


def actions(model, inputs):
    with torch.no_grad():
        return model.sample_actions(**inputs)


def test_keep_all_is_bit_identical_with_several_cameras():
    model, inputs = CASE.model(), pi0_batch([[10, 11, 12], [20]], seed=7, cameras=CAMERAS)
    ref = actions(model, inputs)
    for method in ("divprune", "fastv", "vla_pruner"):
        with vlmprune.wrap(model, method, budget=N) as handle:
            assert torch.equal(actions(model, inputs), ref), method
        assert handle.stats["llm_visual_tokens"] == [N, N, N]


@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_several_cameras_batch_equals_one_by_one(method):
    """Each real camera is one image with its own budget; rows of different kept sets and camera
    counts give what each prompt gives alone."""
    model, inputs = CASE.model(), pi0_batch([[10, 11, 12], [20]], seed=8, cameras=CAMERAS)
    with vlmprune.wrap(model, method, budget=16) as handle:
        batched = actions(model, inputs)
        assert handle.stats["llm_visual_tokens"] == [16, 16, 16] if method == "divprune" else [N, N, N]
        for i in range(2):
            torch.testing.assert_close(actions(model, row_of(inputs, i))[0], batched[i], atol=1e-5, rtol=1e-5)


@dataclass
class NormAbove(vlmprune.Method):
    """A test method whose counts differ per image: the projected tokens whose norm exceeds ``threshold``."""

    name = "test_norm_above"
    stages = ("projector",)
    needs = frozenset({"projected"})
    threshold: float = 0.0

    def select(self, ctx):
        return Selection(keep=[(row > self.threshold).nonzero().flatten() for row in ctx.signals.projected().norm(dim=-1)])


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_rows_keeping_different_counts_equal_one_by_one(positions):
    """Rows left with different prefix lengths (filled on the left): the expert's 2-D mask and
    positions follow each row's own kept set."""
    model, inputs = CASE.model(), CASE.inputs(2, seed=12)
    with torch.no_grad():
        norms = model.model.vlm.get_image_features(inputs["pixel_values"].flatten(0, 1)).pooler_output.norm(dim=-1)
    threshold = float(norms.flatten().median())
    with vlmprune.wrap(model, NormAbove(threshold=threshold), budget=N, positions=positions) as handle:
        batched = actions(model, inputs)
        counts = handle.stats["llm_visual_tokens"]
        assert counts == (norms > threshold).sum(1).tolist() and counts[0] != counts[1]
        for i in range(2):
            torch.testing.assert_close(actions(model, row_of(inputs, i))[0], batched[i], atol=1e-5, rtol=1e-5)


def test_llm_point_equals_hiding_the_dropped_tokens_with_several_cameras():
    """FastV's choice per camera image at LLM layer 2, rebuilt by hiding the dropped prefix tokens
    from the language model's and the expert's layers 2.. (tests/cases_pi0.py masked_actions)."""
    model, inputs = CASE.model(), pi0_batch([[10, 11, 12], [20]], seed=9, cameras=CAMERAS)
    with vlmprune.wrap(model, "fastv", budget=12) as handle, handle.record() as seen:
        pruned = actions(model, inputs)
    ((point, sel),) = [(rec.point, rec.selection) for rec in seen]
    image_rows = [0, 0, 1]
    keep = []
    for row in range(2):
        ids = inputs["input_ids"][row]
        image = (ids == IMAGE).nonzero().flatten()
        kept = [image[j * N + sel.keep[i]] for j, i in enumerate(i for i, r in enumerate(image_rows) if r == row)]
        keep.append(torch.cat([(ids != IMAGE).nonzero().flatten(), *kept]))
    torch.testing.assert_close(pruned, masked_actions(model, inputs, keep, point.layer), atol=1e-5, rtol=1e-5)


def _expert_inputs(model, inputs, layer):
    """``(position_ids of the expert, its layer-``layer`` mask width, that layer's cached prefix length)`` per denoising step."""
    seen = []

    def expert(module, args, kwargs):
        seen.append([kwargs["position_ids"].clone()])

    def attn(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen[-1] += [kwargs["attention_mask"].shape[-1], cache.layers[layer].get_seq_length()]

    hooks = [model.model.dit.register_forward_pre_hook(expert, with_kwargs=True),
             model.model.dit.layers[layer].self_attn.register_forward_pre_hook(attn, with_kwargs=True)]
    try:
        actions(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_expert_positions_masks_and_cache_follow_the_kept_set():
    """Before the LLM: the expert's positions are the unwrapped ones (``positions="original"``) or
    lowered by the 48 tokens each row lost (``"compact"``); inside the LLM (FastV at K = 2): the
    unwrapped positions, and from layer 2 on the expert's mask spans the 16 kept image tokens and
    the suffix, its cache layer cut back to the kept prefix before every step."""
    model, inputs = CASE.model(), CASE.inputs(2, seed=3)
    length, suffix = inputs["input_ids"].shape[1], CHUNK + 1
    ref = _expert_inputs(model, inputs, 2)
    assert len(ref) == 3 and all(w == length + suffix and c == length for _, w, c in ref)
    for positions, shift in (("original", 0), ("compact", N - 16)):
        with vlmprune.wrap(model, "divprune", budget=16, positions=positions):
            got = _expert_inputs(model, inputs, 2)
        assert all(torch.equal(g[0], r[0] - shift) for g, r in zip(got, ref)), positions
        assert all(w == length - (N - 16) + suffix and c == length - (N - 16) for _, w, c in got)
    with vlmprune.wrap(model, "fastv", budget=16):
        got = _expert_inputs(model, inputs, 2)
        early = _expert_inputs(model, inputs, 1)
    assert all(torch.equal(g[0], r[0]) for g, r in zip(got, ref))
    assert all(w == length - (N - 16) + suffix and c == length - (N - 16) for _, w, c in got)
    assert all(w == length + suffix and c == length for _, w, c in early)  # layer 1 reads the whole prefix


def test_inside_the_llm_positions_stay_original():
    with pytest.raises(ValueError, match=r"'llm_positions'.*offers \['original'\]"):
        vlmprune.wrap(CASE.model(), "fastv", budget=16, llm_positions="compact")


def _action_attention_by_hand(inputs, layer):
    """The eager expert's own attention weights at ``layer``: the last CHUNK query rows, mean over
    heads and queries, then over the denoising steps, ``[B, L_prefix]``."""
    model = tiny_pi0("eager")
    rows = []

    def hook(module, args, kwargs, output):
        rows.append(output[1][:, :, -CHUNK:].mean(1).mean(1))

    handle = model.model.dit.layers[layer].self_attn.register_forward_hook(hook, with_kwargs=True)
    try:
        actions(model, inputs)
    finally:
        handle.remove()
    return torch.stack(rows).mean(0)[:, : inputs["input_ids"].shape[1]]


def test_action_history_is_the_expert_attention_averaged_over_denoising_steps():
    """VLA-Pruner's action-level signal on PI0 (ours): after each ``sample_actions`` call one
    ``[n_img, N]`` entry per camera image, the eager expert's attention of the action queries to
    that image's tokens at the method's action layer (2 of 4), averaged over heads, action queries
    and the 3 denoising steps; ``reset()`` clears it, and a copy of the wrapped model keeps its own."""
    inputs = pi0_batch([[10, 11, 12], [20]], seed=10, cameras=CAMERAS)
    by_hand = _action_attention_by_hand(inputs, 2)
    model = tiny_pi0("eager")
    handle = vlmprune.wrap(model, "vla_pruner", budget=16)
    session = handle._plan.session.state
    actions(model, inputs)
    (entry,) = session[HISTORY_KEY].steps
    ids = inputs["input_ids"]
    image = [(ids[r] == IMAGE).nonzero().flatten() for r in range(2)]
    expected = torch.stack([by_hand[0, image[0][:N]], by_hand[0, image[0][N:]], by_hand[1, image[1]]])
    torch.testing.assert_close(entry, expected, atol=1e-6, rtol=1e-5)
    twin = copy.deepcopy(model)
    actions(model, inputs)
    assert len(session[HISTORY_KEY].steps) == 2 and HISTORY_KEY not in Handle.of(twin)._plan.session.state
    handle.reset()
    assert HISTORY_KEY not in handle._plan.session.state and handle._plan.session.steps == 0
    handle.unwrap()


def test_vla_pruner_prunes_after_its_warm_up_and_zeroes_dropped_tokens_in_the_history():
    """The first ``temporal_w`` = 3 control steps run unpruned; the fourth keeps 16 tokens per
    image, and its history entry is 0 on the 48 pruned before the action layer (K = 1 here)."""
    model, inputs = CASE.model(), CASE.inputs(2, seed=11)
    with vlmprune.wrap(model, "vla_pruner", budget=16) as handle:
        counts = []
        for _ in range(4):
            with handle.record() as seen:
                actions(model, inputs)
            counts.append([int(k.numel()) for k, _, _ in seen[0].selection.per_image()])
        steps = handle._plan.session.state[HISTORY_KEY].steps
        assert counts == [[N, N]] * 3 + [[16, 16]]
        assert len(steps) == 4 and [int((s > 0).sum(1).min()) for s in steps[:3]] == [N] * 3
        assert (steps[3] > 0).sum(1).tolist() == [16, 16]


@pytest.mark.parametrize("prefill_attention", [False, True])
def test_prefill_criterion_is_the_eager_prefix_attention(prefill_attention):
    """VLA-Pruner's prefill score on PI0 at layer K - 1 = 0: the eager language model's own
    attention weights (bidirectional prefix), mean over heads, of the prompt's last token
    (FastV's criterion) or of every real query row (the paper's), on each image token."""
    model, inputs = tiny_pi0("eager"), CASE.inputs(2, seed=13)
    weights = []
    hook = model.model.vlm.language_model.layers[0].self_attn.register_forward_hook(lambda m, a, o: weights.append(o[1]))
    actions(model, inputs)
    hook.remove()
    probs = weights[0].mean(1)  # [B, L, L]
    method = vlmprune.get_method("vla_pruner")(use_temporal=False, use_prefill_attention=prefill_attention)
    with vlmprune.wrap(model, method, budget=16) as handle, handle.record() as seen:
        actions(model, inputs)
    real, ids = inputs["attention_mask"].bool(), inputs["input_ids"]
    for i in range(2):
        rows = probs[i][real[i]] if prefill_attention else probs[i][-1:]
        expected = rows.mean(0)[ids[i] == IMAGE]
        torch.testing.assert_close(seen[0].selection.scores[i], expected, atol=1e-6, rtol=1e-5)
