"""DART (vlmprune/methods/dart.py): the card's oracle and the official count on planted signals, the
count through a real tiny LLaVA; the conformance kit runs manual, batch, cache, determinism and
unwrap on every VLM family."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from adapters.decoder import InstructionStates
from vlmprune.context import Signals, TokenContext
from vlmprune.methods.dart import DART

from .cases import LLAVA


def context(tokens, states, budget):
    signals = Signals({"instruction_states": lambda layer=1: states, "llm_norm": lambda: torch.nn.Identity(),
                       "hidden": lambda: tokens})
    n = tokens.shape[1]
    return TokenContext(tokens=tokens, stage="llm", layer=2, budget=budget, target=budget, grid=(1, n),
                        token_index=torch.arange(n)[None], signals=signals)


def planted(n=20, text=5, odd=13, seed=0):
    """Image tokens all equal but token ``odd``; keys whose L1 norm is largest for image tokens
    0..3 and text tokens 0..3."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.ones(1, n, 8)
    tokens[0, odd] = torch.randn(8, generator=g)
    image_keys = torch.ones(n, 6)
    image_keys[:4] *= 10
    text_keys = torch.ones(text, 6)
    text_keys[:4] *= 10
    states = [InstructionStates(image_keys, text_keys, torch.randn(text, 8, generator=g), torch.arange(35, 35 + n),
                                torch.arange(35 + n, 35 + n + text))]
    return tokens, states


def test_the_one_token_unlike_the_others_is_always_kept():
    """Card oracle: all image hidden states identical but one: that one is the least similar to
    any pivot, so the first pivot to choose takes it."""
    for odd in (6, 13, 19):
        tokens, states = planted(odd=odd)
        keep = DART().select(context(tokens, states, budget=8)).keep[0]
        assert odd in keep.tolist()


def test_count_is_image_pivots_plus_budget_per_pivot_and_pivots_are_the_largest_keys():
    """budget 8 with 4 + 4 pivots: each takes 8 // 8 = 1 token, plus the 4 image pivots (the
    official max_num_trunction semantics: 12 kept); the image pivots are the 4 largest-L1 keys."""
    tokens, states = planted(n=20)
    keep = DART().select(context(tokens, states, budget=8)).keep[0].tolist()
    assert len(keep) == 12 and keep == sorted(keep) and {0, 1, 2, 3} <= set(keep)
    index = DART(pivot_order="index").select(context(tokens, states, budget=8)).keep[0].tolist()
    assert len(index) == 12


def official(tokens, states, budget, order):
    """The official ``get_retained_image_token`` loop by hand (final norm: identity): pivots in
    ``order`` (prompt positions), each taking its ``budget // 8`` least cosine-similar free tokens."""
    s = states[0]
    image, text = tokens[0], s.text_hidden
    image_pivots = s.image_keys.abs().sum(-1).topk(4).indices.tolist()
    text_pivots = s.text_keys.abs().sum(-1).topk(4).indices.tolist()
    vectors = {int(s.image_places[i]): image[i] for i in image_pivots} | {int(s.text_places[i]): text[i] for i in text_pivots}
    free = [i for i in range(image.shape[0]) if i not in image_pivots]
    kept = set(image_pivots)
    for place in order(vectors):
        sim = -torch.nn.functional.cosine_similarity(vectors[place][None], image[free], dim=-1)
        took = [free[i] for i in sim.topk(budget // 8).indices.tolist()]
        kept.update(took)
        free = [i for i in free if i not in took]
    return sorted(kept)


def test_pivots_choose_in_the_order_of_the_codes_python_set():
    """The official code iterates a Python set of the pivots' prompt positions; with the image from
    position 29 (pivots at 29..32, text at 49..52) that order is not ascending. Both orders equal
    the official loop by hand with that order."""
    torch.manual_seed(0)
    tokens = torch.randn(1, 20, 8)
    _, states = planted(n=20)
    states[0].image_places -= 6
    states[0].text_places -= 6
    assert list(set(range(29, 33)) | set(range(49, 53))) != sorted(range(29, 33)) + sorted(range(49, 53))
    by_set = DART().select(context(tokens, states, budget=8)).keep[0].tolist()
    by_index = DART(pivot_order="index").select(context(tokens, states, budget=8)).keep[0].tolist()
    assert by_set == official(tokens, states, 8, lambda v: list(set(v)))
    assert by_index == official(tokens, states, 8, sorted)
    assert by_set != by_index


def test_through_a_tiny_llava_the_count_follows_the_code():
    case = LLAVA[0]
    model, inputs = case.model(), case.inputs(2, seed=0)
    with vlmprune.wrap(model, "dart", budget=64) as handle, handle.record() as seen:
        case.forward(model, inputs)
    counts = handle.stats["points"][0]["out"]
    assert handle.stats["points"][0]["point"] == "llm:2"
    for count, keep in zip(counts, seen[0].selection.keep):
        assert count == keep.numel() and count in (4 + 8 * 8, 4 + 7 * (64 // 7), 4 + 6 * (64 // 6), 4 + 5 * (64 // 5))


@pytest.mark.parametrize("options,match", [({"k_layer": 0}, "option 'k_layer' of method 'dart' must be in"),
                                           ({"pivot_image_tokens": 0, "pivot_text_tokens": 0}, "cannot both be 0"),
                                           ({"pivot_order": "random"}, "option 'pivot_order' of method 'dart' must be one of")])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        vlmprune.wrap(LLAVA[0].model(), "dart", budget=64, **options)
