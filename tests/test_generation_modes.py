"""Every generation mode works on a wrapped model, on every VLM family (LLaVA, LLaVA-NeXT,
Qwen2-VL, Qwen2.5-VL), for a projector-stage method (DivPrune) and an llm-stage one (FastV), on a
left-padded batch of 2: greedy, seeded sampling with ``num_return_sequences``, beam search with
``num_return_sequences``, a static cache and no cache. At keep-all each equals the unwrapped
model's output; pruned, each agrees with its reference (no cache and a static cache equal the
dynamic-cache run, ``num_beams=1`` equals greedy, sampling with ``num_return_sequences=2`` equals
sampling from the prompts repeated by hand, beam search of a batch equals each prompt alone)."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from tests.cases import EXPECT, LLAVA
from tests.cases import NEXT as nxt
from tests.tiny import (
    IMAGE_TOKEN,
    QWEN_IMAGE,
    batch,
    n_patches,
    qwen_batch,
    tiny_llava,
    tiny_qwen,
)

STEPS = 3
FAMILIES = ("llava", "next", "qwen2", "qwen2.5")
METHODS = ("divprune", "fastv")
MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, num_return_sequences=2),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "beam1": dict(do_sample=False, num_beams=1),
    "static": dict(do_sample=False, cache_implementation="static"),
    "no_cache": dict(do_sample=False, use_cache=False),
}
_MODELS: dict = {}
_REFS: dict = {}


def qwen_inputs(texts, grids, seeds):
    """Like :func:`qwen_batch`, each prompt's image drawn from its own seed (so a prompt alone,
    or repeated, gets the same pixels)."""
    parts = [qwen_batch([t], [g], seed=s) for t, g, s in zip(texts, grids, seeds)]
    longest = max(p["input_ids"].shape[1] for p in parts)
    pad = lambda x: torch.cat([x.new_zeros(1, longest - x.shape[1]), x], 1)
    out = {k: torch.cat([pad(p[k]) for p in parts]) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out["pixel_values"] = torch.cat([p["pixel_values"] for p in parts])
    out["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in parts])
    return out


def family(name):
    """``(model, inputs for prompts [0, 1] or a selection of them, placeholder id)``."""
    if name not in _MODELS:
        if name == "llava":
            model = tiny_llava()

            def inputs(rows=(0, 1)):
                one = [batch([[10, 11, 12]], seed=1), batch([[20, 21]], seed=2)]
                return batch_of([one[r] for r in rows])

        elif name == "next":
            model = nxt.model()

            def inputs(rows=(0, 1)):
                texts, sizes = [nxt.TEXTS[r] for r in rows], [nxt.SIZES[r] for r in rows]
                out = nxt.next_batch(texts, sizes)
                gen = [torch.Generator().manual_seed(5 + r) for r in rows]
                for i, g in enumerate(gen):  # each prompt's pixels from its own seed
                    k = nxt.CROPS[nxt.SIZES.index(sizes[i])]
                    out["pixel_values"][i] = 0
                    out["pixel_values"][i, :k] = torch.randn(k, 3, nxt.SIDE, nxt.SIDE, generator=g)
                return out

        else:
            model = tiny_qwen(name[4:])

            def inputs(rows=(0, 1)):
                texts, grids = [[10, 11, 12, 13], [20, 21]], [(16, 16), (12, 16)]
                return qwen_inputs([texts[r] for r in rows], [grids[r] for r in rows], [1 + r for r in rows])

        _MODELS[name] = (model, inputs, QWEN_IMAGE if name.startswith("qwen") else IMAGE_TOKEN)
    return _MODELS[name]


def batch_of(parts):
    """Left-pad single-prompt LLaVA inputs into one batch."""
    longest = max(p["input_ids"].shape[1] for p in parts)
    pad = lambda x: torch.cat([x.new_zeros(1, longest - x.shape[1]), x], 1)
    return {
        "input_ids": torch.cat([pad(p["input_ids"]) for p in parts]),
        "attention_mask": torch.cat([pad(p["attention_mask"]) for p in parts]),
        "pixel_values": torch.cat([p["pixel_values"] for p in parts]),
    }


def generate(model, inputs, image_id, **mode):
    torch.manual_seed(0)
    out = model.generate(
        **inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, suppress_tokens=[image_id], **mode
    )
    return out[:, inputs["input_ids"].shape[1] :]


def keep_all(name):
    return n_patches() if name == "llava" else 1.0


cases = pytest.mark.parametrize("fam,method", [(f, m) for f in FAMILIES for m in METHODS])


@cases
def test_every_mode_at_keep_all_equals_the_unwrapped_model(fam, method):
    model, inputs, image_id = family(fam)
    if fam not in _REFS:
        _REFS[fam] = {mode: generate(model, inputs(), image_id, **kw) for mode, kw in MODES.items()}
    with vlmprune.wrap(model, method, budget=keep_all(fam)):
        for mode, kw in MODES.items():
            assert torch.equal(generate(model, inputs(), image_id, **kw), _REFS[fam][mode]), mode


@cases
def test_pruned_modes_agree_with_their_references(fam, method):
    model, inputs, image_id = family(fam)
    two = inputs()
    with vlmprune.wrap(model, method, budget=0.25) as handle:
        greedy = generate(model, two, image_id, **MODES["greedy"])
        stats = _prompt_stats(handle)
        assert stats["llm_prefill_flops"] < 0.8 * stats["llm_prefill_flops_unpruned"]  # it prunes
        for mode in ("beam1", "static", "no_cache"):
            assert torch.equal(generate(model, two, image_id, **MODES[mode]), greedy), mode
            assert _prompt_stats(handle) == stats, mode  # the prompt's, not prompt + generated tokens
        # sampling: generate() repeats each prompt twice; the same as repeating them by hand
        sampled = generate(model, two, image_id, **MODES["sample"])
        assert torch.equal(generate(model, inputs((0, 0, 1, 1)), image_id, do_sample=True), sampled)
        # beam search: each prompt's beams see that prompt's own (pruned) image
        beams = generate(model, two, image_id, **MODES["beam"])
        assert beams.shape[0] == 4
        for r in (0, 1):
            alone = generate(model, inputs((r,)), image_id, **MODES["beam"])
            assert torch.equal(beams[2 * r : 2 * r + 2], alone), r


def _prompt_stats(handle):
    return {k: v for k, v in handle.stats.items() if k.startswith(("llm_", "kv_"))}


def test_decode_step_on_another_prefills_cache_is_refused():
    """Manual prefill/decode loops of two prompts interleaved: prompt A's decode step after B's
    prefill would apply B's pruning to A's cache; it raises instead. B's own step still works."""
    model, inputs, _ = family("llava")
    a, b = inputs((0,)), inputs((1,))
    with vlmprune.wrap(model, "fastv", budget=0.25), torch.no_grad():
        expected = model.generate(**b, max_new_tokens=2, do_sample=False)[0, -2:]
        out_a, out_b = model(**a), model(**b)
        name = next(n for n in ("cache", "past_key_values") if n in out_a)  # 5.24 renamed it
        nxt_a, nxt_b = out_a.logits[:, -1:].argmax(-1), out_b.logits[:, -1:].argmax(-1)
        mask_a = torch.cat([a["attention_mask"], torch.ones_like(nxt_a)], 1)
        with pytest.raises(RuntimeError, match="not filled by the latest prefill"):
            model(input_ids=nxt_a, attention_mask=mask_a, **{name: out_a[name]})
        mask_b = torch.cat([b["attention_mask"], torch.ones_like(nxt_b)], 1)
        step = model(input_ids=nxt_b, attention_mask=mask_b, **{name: out_b[name]})
        assert [int(nxt_b), int(step.logits[0, -1].argmax())] == expected.tolist()


@pytest.mark.parametrize("row", sorted(row for row, spec in EXPECT.items() if ("*", "llava") not in spec.skip))
def test_every_method_through_beam_search_static_and_no_cache(row):
    """Every row of the expectation table run on LLaVA (state carried from the vision side into
    the LLM included, VFlowOpt's importance map): no cache and a static cache equal greedy, and,
    where the selection does not depend on the other images, a batch's beams equal each prompt's own."""
    model, inputs, image_id = family("llava")
    spec = EXPECT[row]
    two = inputs()
    with vlmprune.wrap(model, spec.method, budget=0.25, **LLAVA[0].options(row, "batch")):
        greedy = generate(model, two, image_id, **MODES["greedy"])
        for mode in ("static", "no_cache"):
            assert torch.equal(generate(model, two, image_id, **MODES[mode]), greedy), mode
        beams = generate(model, two, image_id, **MODES["beam"])
        assert beams.shape[0] == 4
        if spec.reason("batch", LLAVA[0]) is None:
            for r in (0, 1):
                assert torch.equal(beams[2 * r : 2 * r + 2], generate(model, inputs((r,)), image_id, **MODES["beam"])), r
