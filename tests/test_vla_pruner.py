"""VLA policies and VLA-Pruner (issue 16): the card's planted oracles, the policy's action decoding,
the action-attention history against the eager model's own attentions, and the episode as the
session (reset, replay, two policies, a batch of episodes)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import LogitsProcessorList
from vlmprune.adapters import find_adapter
from vlmprune.adapters.vla import HISTORY_KEY

import vlmprune
from tests import cases  # noqa: F401  (the kit first: it imports tests/cases_vla.py)
from tests.cases_vla import ACTION_DIM, BINS, tiny_policy
from tests.contexts import make_context
from tests.tiny import batch, tiny_llava
from tests.truth import full_embeddings, positions_from_mask
from vlmprune.methods.vla_pruner import dual_level_select, temporal_guide
from vlmprune.vla import VLAPolicy, _ActionIdsOnly

TEXTS = [[10, 11, 12, 13], [20, 21]]
_POLICIES: dict = {}


def policy(attn: str = "sdpa") -> VLAPolicy:
    if attn not in _POLICIES:
        _POLICIES[attn] = tiny_policy(attn)
    return _POLICIES[attn]


def frame(step: int, rows=(0, 1)) -> dict:
    """Control step ``step`` of the test episodes: prompt ``TEXTS[r]`` and a new random frame per row."""
    full = batch(TEXTS, seed=100 + step)
    if len(rows) == len(TEXTS):
        return full
    one = batch([TEXTS[r] for r in rows], seed=0)
    one["pixel_values"] = full["pixel_values"][list(rows)]
    return one


def run_episode(p, handle, steps: int, rows=(0, 1)):
    """Actions and, per step, the raster indices kept at the LLM point (one list per row)."""
    actions, kept = [], []
    for t in range(steps):
        with handle.record() as records:
            actions.append(p.predict_action(**frame(t, rows)))
        (rec,) = records
        kept.append([rec.token_index[j][rec.selection.keep[j]].tolist() for j in range(len(rows))])
    return torch.stack(actions), kept


# -- the card's oracles on planted tensors ---------------------------------------------------------------
def _ctx(current, history, embeddings=None, budget=3, n=None):
    b, n = current.shape
    def projected():
        if embeddings is None:
            raise AssertionError("the diversity step ran")
        return embeddings
    signals = {"text_attention": lambda layer, query: current, "action_history": lambda: history, "projected": projected}
    return make_context(torch.zeros(b, n, 4), budget, signals, stage="llm", layer=1)


def test_oracle_1_without_the_temporal_term_the_prefill_top_k_and_warm_up_keeps_all():
    current = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0, 0.7, 0.2, 0.6]])
    topk = torch.tensor([[1, 3, 5]])
    for prefill in (False, True):
        method = vlmprune.get_method("vla_pruner")(use_temporal=False, use_prefill_attention=prefill)
        assert torch.equal(method.select(_ctx(current, None)).keep, topk)
    history = [torch.rand(1, 8) for _ in range(2)]  # two steps of w = 3: the code's warm-up, unpruned
    sel = vlmprune.get_method("vla_pruner")().select(_ctx(current, history))
    assert torch.equal(sel.keep, torch.arange(8)[None])


def test_oracle_2_when_both_top_k_coincide_that_set_without_diversity():
    current = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0, 0.7, 0.2, 0.6]])
    history = [torch.tensor([[0.0, 5.0, 0.0, 4.0, 0.0, 3.0, 0.0, 0.0]])] * 3
    sel = vlmprune.get_method("vla_pruner")().select(_ctx(current, history))  # projected() would raise
    assert torch.equal(sel.keep, torch.tensor([[1, 3, 5]]))


def _greedy_by_hand(emb: torch.Tensor, k: int) -> list[int]:
    """The official ``_redundancy_minization``: first the column whose second-smallest cosine
    distance is largest, then the candidate whose smallest distance to the picked rows is largest."""
    x = emb / emb.norm(dim=1, keepdim=True)
    dist = 1 - x @ x.T
    picks = [int(torch.topk(dist, 2, dim=0, largest=False).values[1].argmax())]
    while len(picks) < k:
        picks.append(int(dist[picks].min(dim=0).values.argmax()))
    return picks


def test_oracle_3_disjoint_top_k_max_min_diversity_on_the_union():
    gen = torch.Generator().manual_seed(3)
    current = torch.tensor([[9.0, 8.0, 7.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.3, 0.0]])
    guide = torch.tensor([[0.0, 0.0, 0.0, 6.0, 5.0, 4.0, 0.0, 0.0, 0.0, 0.1]])
    embeddings = torch.randn(1, 10, 5, generator=gen)
    union = torch.tensor([0, 1, 2, 3, 4, 5])  # |U| = 6, k = 3
    ref = sorted(union[_greedy_by_hand(embeddings[0, union], 3)].tolist())
    keep = dual_level_select(guide, current, lambda: embeddings, 3)
    assert keep.tolist() == [ref] and len(set(ref)) == 3 and set(ref) <= set(union.tolist())
    sel = vlmprune.get_method("vla_pruner")().select(_ctx(current, [guide] * 3, embeddings))
    assert sel.keep.tolist() == [ref]
    # several draws: the selection is the hand greedy's on the union, k tokens, every time
    for _ in range(20):
        embeddings = torch.randn(1, 10, 5, generator=gen)
        assert dual_level_select(guide, current, lambda e=embeddings: e, 3).tolist() == [sorted(union[_greedy_by_hand(embeddings[0, union], 3)].tolist())]


def test_oracle_4_decay_weights_code_and_recent_first():
    history = [torch.eye(3)[i][None] for i in range(3)]  # e_0, e_1, e_2, oldest first
    torch.testing.assert_close(temporal_guide(history, 0.8, "code"), torch.tensor([[1, 0.8, 0.64]]) / 2.44)
    torch.testing.assert_close(temporal_guide(history, 0.8, "recent_first"), torch.tensor([[0.64, 0.8, 1]]) / 2.44)
    with pytest.raises(ValueError, match="temporal_weight_order must be one of"):
        temporal_guide(history, 0.8, "newest")


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"option 'temporal_weight_order' of method 'vla_pruner' must be one of \['code', 'recent_first'\]"):
        vlmprune.get_method("vla_pruner")(temporal_weight_order="newest")
    with pytest.raises(ValueError, match="'temporal_w' of method 'vla_pruner' must be >= 1"):
        vlmprune.get_method("vla_pruner")(temporal_w=0)
    m = tiny_llava()
    with pytest.raises(ValueError, match="use_temporal=True reads the action decoding's history of a VLA policy"):
        vlmprune.wrap(m, "vla_pruner", budget=0.25)
    assert vlmprune.Handle.of(m) is None
    method = vlmprune.get_method("vla_pruner")()
    info = find_adapter(policy()).info()
    assert method.layers(info) == (1, 2)  # 3 and 15 of 32 on 4 layers
    assert vlmprune.get_method("vla_pruner")(k_layer=2, action_layer=3, layers_of=0).layers(info) == (2, 3)
    with pytest.raises(ValueError, match=r"option 'k_layer' of method 'vla_pruner' must be in \[1, 3\] on this LLM, got 4"):
        vlmprune.get_method("vla_pruner")(k_layer=4, layers_of=0).layers(info)


# -- the policy ----------------------------------------------------------------------------------------
def test_policy_decodes_action_ids_into_bin_values():
    p = policy()
    inputs = frame(0)
    ids = p.action_tokens(**inputs)
    assert ids.shape == (2, ACTION_DIM) and bool(((ids >= 96 - BINS) & (ids < 96)).all())
    centres = -1 + (2 * torch.arange(BINS) + 1) / BINS
    torch.testing.assert_close(p(**inputs), centres[95 - ids])
    assert p.tokens_to_actions(torch.tensor([[95, 80]])).tolist() == [[centres[0].item(), centres[15].item()]]
    for i in range(2):  # a batch = its prompts one by one
        assert torch.equal(p.action_tokens(**frame(0, rows=(i,)))[0], ids[i])
    scaled = VLAPolicy(p.llava, action_dim=ACTION_DIM, bins=BINS, low=[0.0, 0, 0], high=[2.0, 4, 6])
    torch.testing.assert_close(scaled(**inputs), (centres[95 - ids] + 1) / 2 * torch.tensor([2.0, 4, 6]))
    with pytest.raises(ValueError, match="parameter 'bins' must be an int in"):
        VLAPolicy(p.llava, bins=0)
    with pytest.raises(ValueError, match="one value per bin"):
        VLAPolicy(p.llava, bins=4, values=[0.0, 1.0])
    with pytest.raises(TypeError, match="VLAPolicy wraps a LlavaForConditionalGeneration"):
        VLAPolicy(torch.nn.Linear(2, 2))


def test_other_methods_run_on_the_policy():
    p = policy()
    for name in ("fastv", "divprune", "uniform", "random"):
        with vlmprune.wrap(p, name, budget=0.25) as handle:
            actions = p.predict_action(**frame(0))
            assert actions.shape == (2, ACTION_DIM)
            assert [pt["out"] for pt in handle.stats["points"]] == [[64, 64]]


# -- the action-attention history -------------------------------------------------------------------------
def _eager_history(p, inputs, keep_raster=None) -> torch.Tensor:
    """The history vector of one control step from the eager model's own attention weights at layer 2
    (``generate(output_attentions=True)``): per row, the rows of the queries producing each action id
    (the prompt's last token, then each decode step), head mean, over the image tokens; run on the
    wrapped model when ``keep_raster`` (the raster indices kept, per row) is given."""
    out = p.llava.generate(**inputs, max_new_tokens=ACTION_DIM, min_new_tokens=ACTION_DIM, do_sample=False,
                           logits_processor=LogitsProcessorList([_ActionIdsOnly(p.action_ids)]),
                           output_attentions=True, return_dict_in_generate=True)
    ids = inputs["input_ids"]
    vec = torch.zeros(ids.shape[0], 256)
    for r in range(ids.shape[0]):
        img = (ids[r] == 3).nonzero().flatten()
        raster = torch.arange(256) if keep_raster is None else torch.tensor(keep_raster[r])
        cols = img[0] + (torch.arange(256) if keep_raster is None else torch.arange(len(raster)))
        rows = [out.attentions[0][2][r, :, -1]] + [out.attentions[j][2][r, :, 0] for j in range(1, ACTION_DIM)]
        vec[r, raster] = torch.stack([row.mean(0)[cols] for row in rows]).mean(0)
    return vec


def test_history_equals_the_eager_models_attentions_unpruned_and_pruned():
    p = policy("eager")
    with vlmprune.wrap(p, "vla_pruner", budget=0.25, temporal_w=1) as handle:
        p.predict_action(**frame(0))  # warm-up step: nothing pruned
        (unpruned,) = handle._plan.session.state[HISTORY_KEY].steps
    torch.testing.assert_close(unpruned, _eager_history(p, frame(0)), atol=1e-6, rtol=1e-5)
    with vlmprune.wrap(p, "vla_pruner", budget=0.25, temporal_w=1) as handle:
        history = lambda: handle._plan.session.state[HISTORY_KEY].steps
        p.predict_action(**frame(0))
        with handle.record() as records:
            p.predict_action(**frame(1))  # pruned to 64: the run's own vector
        (rec,) = records
        kept = [rec.token_index[j][rec.selection.keep[j]].tolist() for j in range(2)]
        assert len(history()) == 2 and all(len(k) == 64 for k in kept)
        captured = history()[1]
        dropped = torch.ones(2, 256, dtype=torch.bool)
        for j in range(2):
            dropped[j, kept[j]] = False
        assert bool((captured[dropped] == 0).all()) and bool((captured[~dropped] > 0).all())  # no credit for pruned tokens
        # the same step again (a third step with frame 1 after the same history) through generate(output_attentions)
        handle.reset()
        p.predict_action(**frame(0))
        with handle.record() as records:
            reference = _eager_history(p, frame(1), kept)
        assert [records[0].token_index[j][records[0].selection.keep[j]].tolist() for j in range(2)] == kept
        torch.testing.assert_close(captured, reference, atol=1e-6, rtol=1e-5)


@dataclass
class _SignalProbe(vlmprune.Method):
    """Test-only: at llm:1 keeps the even tokens and records the VLA adapter's LLM-stage signals; at
    llm:2 keeps every token and records ``projected`` with the raster indices alive there."""

    name = "vla_signal_probe"
    stages = ("llm",)
    needs = frozenset({"text_attention", "projected"})

    def __post_init__(self):
        super().__post_init__()
        self.seen: dict = {}

    def points(self, info):
        return [vlmprune.Point("llm", 1), vlmprune.Point("llm", 2)]

    def capture_layers(self, info):
        return {"encoder": (), "llm": (0,)}

    def select(self, ctx):
        b = ctx.tokens.shape[0]
        if ctx.layer == 2:
            self.seen.update(later=ctx.signals.projected(), alive=ctx.token_index)
            return vlmprune.Selection(keep=torch.arange(ctx.n).expand(b, -1).clone())
        self.seen = {"last": ctx.signals.text_attention(layer=0, query="last"), "all": ctx.signals.text_attention(layer=0, query="all"),
                     "projected": ctx.signals.projected()}
        return vlmprune.Selection(keep=torch.arange(0, ctx.n, 2).expand(b, -1).clone())


def test_llm_stage_signals_equal_the_eager_models_attentions_and_embeddings():
    """Both criteria against layer 0's eager attention weights (the last prompt token's row; the
    mean over every real query row), ``projected`` against the LM input embeddings (also at a point
    after another one)."""
    p, probe = policy("eager"), _SignalProbe()
    inputs = frame(0)
    with torch.no_grad():
        out = p.llava(**inputs, position_ids=positions_from_mask(inputs["attention_mask"]), output_attentions=True)
        embeds = full_embeddings(p.llava, inputs)
    with vlmprune.wrap(p, probe, budget=1.0), torch.no_grad():
        p.llava(**inputs, position_ids=positions_from_mask(inputs["attention_mask"]))
    for r in range(2):
        img = (inputs["input_ids"][r] == 3).nonzero().flatten()
        real = inputs["attention_mask"][r].bool()
        heads = out.attentions[0][r].mean(0)  # [L, L]
        torch.testing.assert_close(probe.seen["last"][r], heads[-1, img], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(probe.seen["all"][r], heads[real][:, img].mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(probe.seen["projected"][r], embeds[r, img], atol=1e-6, rtol=1e-5)
        assert probe.seen["alive"][r].tolist() == list(range(0, 256, 2))
        torch.testing.assert_close(probe.seen["later"][r], embeds[r, img[0::2]], atol=1e-6, rtol=1e-5)


# -- episodes ------------------------------------------------------------------------------------------
def test_warm_up_then_budget_reset_clears_history_and_an_episode_replays():
    p = policy()
    with vlmprune.wrap(p, "vla_pruner", budget=0.25) as handle:
        actions, kept = run_episode(p, handle, 5)
        assert [len(k[0]) for k in kept] == [256, 256, 256, 64, 64]  # w = 3 warm-up steps, then 64 of 256
        session = handle._plan.session
        assert session.steps == 5 and len(session.state[HISTORY_KEY].steps) == 5
        handle.reset()
        assert session.state == {} and session.steps == 0
        again, kept_again = run_episode(p, handle, 5)
    assert torch.equal(actions, again) and kept == kept_again


def test_the_temporal_term_changes_the_choice():
    """Not FastV under another name: with the history, the kept set differs from the criterion's top-k."""
    p = policy()
    with vlmprune.wrap(p, "vla_pruner", budget=0.25, temporal_w=1) as handle:
        _, kept = run_episode(p, handle, 3)
    with vlmprune.wrap(p, "vla_pruner", budget=0.25, use_temporal=False) as handle:
        _, plain = run_episode(p, handle, 3)
    assert [len(k[0]) for k in kept] == [256, 64, 64] and [len(k[0]) for k in plain] == [64] * 3
    assert kept[1] != plain[1] and kept[2] != plain[2]


def test_two_wrapped_policies_and_two_episodes_never_share_history():
    a, b = policy(), tiny_policy(seed=0)  # same weights, two models
    with vlmprune.wrap(a, "vla_pruner", budget=0.25, temporal_w=1) as ha:
        alone, kept_alone = run_episode(a, ha, 3)
        ha.reset()
        with vlmprune.wrap(b, "vla_pruner", budget=0.25, temporal_w=1) as hb:
            got, kept = [], []
            for t in range(3):  # a's episode interleaved with b's on other frames
                b.predict_action(**frame(t + 50))
                with ha.record() as records:
                    got.append(a.predict_action(**frame(t)))
                kept.append([records[0].token_index[j][records[0].selection.keep[j]].tolist() for j in range(2)])
            assert hb._plan.session.state[HISTORY_KEY] is not ha._plan.session.state[HISTORY_KEY]
    assert torch.equal(torch.stack(got), alone) and kept == kept_alone


def test_a_batch_of_episodes_equals_them_one_by_one():
    p = policy()
    with vlmprune.wrap(p, "vla_pruner", budget=0.25, temporal_w=1) as handle:
        together, kept = run_episode(p, handle, 3)
        for r in range(2):
            handle.reset()
            alone, kept_alone = run_episode(p, handle, 3, rows=(r,))
            assert torch.equal(alone[:, 0], together[:, r])
            assert [k[0] for k in kept_alone] == [k[r] for k in kept]
        with pytest.raises(RuntimeError, match="this episode's earlier steps ran 1 prompts, this one 2.*handle.reset"):
            p.predict_action(**frame(3))


@pytest.mark.parametrize("mode", [{"use_cache": False}, {"cache_implementation": "static"}])
def test_an_episode_without_cache_or_with_a_static_cache_equals_the_cached_one(mode):
    """generate() without a cache re-runs the prompt at every new id (the adapter replays the
    step's choice): the same ids and the same history as with the dynamic cache; a static cache too."""
    p = policy()
    with vlmprune.wrap(p, "vla_pruner", budget=0.25, temporal_w=1) as handle:
        runs = []
        for kwargs in ({}, mode):
            handle.reset()
            ids = [p.action_tokens(**frame(t), **kwargs) for t in range(3)]
            runs.append((ids, list(handle._plan.session.state[HISTORY_KEY].steps), handle.stats["points"]))
    (ids_a, hist_a, points_a), (ids_b, hist_b, points_b) = runs
    assert all(torch.equal(a, b) for a, b in zip(ids_a, ids_b)) and points_a == points_b
    assert points_a == [{"point": "llm:1", "in": [256, 256], "out": [64, 64]}]
    for a, b in zip(hist_a, hist_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
