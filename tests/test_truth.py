"""The six truth tests of DESIGN.md for the LLaVA adapter x every baseline, on tiny random
models (CLIP, SigLIP without CLS, DINOv2 towers; SDPA and eager), CPU, no network."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from tests.tiny import IMAGE_TOKEN, batch, n_patches, tiny_llava
from vlmprune.methods.atp import ThresholdHeads
from vlmprune.methods.covipal import PPM
from tests.truth import (
    Replay,
    greedy_no_cache,
    manual_encoder_features,
    manual_llm_prune,
    manual_multistage,
    positions_from_mask,
    pruned_prompt,
    record_selections,
    vision_features,
)

ADAPTERS = [("clip", "sdpa"), ("clip", "eager"), ("siglip", "sdpa"), ("dinov2", "sdpa")]


def random_atp_heads():
    """ATP threshold heads for the tiny 4-layer LLM (points 1, 2, 3) with random outputs."""
    gen = torch.Generator().manual_seed(0)
    heads = ThresholdHeads((1, 2, 3))
    for mlp in heads.mlps:
        with torch.no_grad():
            for p in mlp.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return heads.eval()


# identity: does keeping every token reproduce the unwrapped model (merging methods add or
# change tokens by design); batch: is the selection independent of the other images.
METHODS = {
    "random": dict(options={}, identity=True, batch=False),
    "uniform": dict(options={}, identity=True, batch=True),
    "divprune": dict(options={}, identity=True, batch=True),
    "fastv": dict(options={}, identity=True, batch=True),
    "visionzip": dict(options={}, identity=False, batch=True),
    "prumerge_plus": dict(options={}, identity=False, batch=True),
    "flowcut": dict(options={}, identity=True, batch=False),  # batch-max entropy count (code default)
    "hiprune": dict(options={}, identity=True, batch=True),
    "holov": dict(options={}, identity=True, batch=True),
    "fopru": dict(options={}, identity=True, batch=True),
    "vflowopt": dict(options={}, identity=False, batch=True),  # recycling merges int(N/m^2) cells even at full budget
    "todre": dict(options={}, identity=False, batch=True),  # stage 2 halves the tokens inside the LLM at any budget
    "zoo_prune": dict(options={}, identity=True, batch=True),  # the same directions at every call
    "feather": dict(options={}, identity=True, batch=True),
    "transprune": dict(options={}, identity=True, batch=True),  # TTV softmax per sample (official: over the batch)
    "adatoken3d": dict(options={}, identity=True, batch=True),
    "atp": dict(options={}, identity=True, batch=True),  # ATP-TF; per-image counts
    # learned thresholds with random heads (a row id; "method" names the registered method)
    "atp_learned": dict(method="atp", options={"weights": random_atp_heads()}, identity=True, batch=True),
    "covipal": dict(options={"weights": PPM(64, seed=0)}, identity=True, batch=True),  # random PPM
}
TEXTS = [[10, 11, 12, 13, 14], [20, 21], [30, 31, 32]]
# eager attention changes only the LLM's attention kernel: run it for methods that prune inside
# the LLM (where the adapter gathers 4-D masks) and for one projector-stage method
EAGER_METHODS = {"divprune", "fastv", "todre", "vflowopt", "feather", "transprune", "adatoken3d", "atp", "atp_learned"}
BUDGET = 24


_MODELS: dict = {}


def model_for(tower: str, attn: str):
    key = (tower, attn)
    if key not in _MODELS:
        _MODELS[key] = tiny_llava(tower, attn)
    return _MODELS[key]


_REFERENCES: dict = {}


def unwrapped_reference(tower: str, attn: str, inputs):
    """Logits and greedy tokens of the unwrapped model (computed once per adapter)."""
    if (tower, attn) not in _REFERENCES:
        model = model_for(tower, attn)
        _REFERENCES[(tower, attn)] = (forward(model, inputs), generate(model, inputs))
    return _REFERENCES[(tower, attn)]


def wrap_or_skip(model, name, budget, **options):
    """Wrap with the method of table row ``name`` (its ``"method"`` where the row id differs)."""
    method = METHODS.get(name, {}).get("method", name)
    cls = vlmprune.get_method(method)
    if model.config.text_config._attn_implementation == "eager" and name not in EAGER_METHODS:
        pytest.skip("eager differs from SDPA only inside the LLM: run for methods with llm points and one projector method")
    if cls.requires_cls and model.config.vision_config.model_type == "siglip_vision_model":
        with pytest.raises(ValueError, match="CLS"):
            vlmprune.wrap(model, name, budget=budget, **options)
        pytest.skip(f"{name} needs a CLS token; SigLIP has none (clear error checked)")
    return vlmprune.wrap(model, method, budget=budget, **options)


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, position_ids=positions_from_mask(inputs["attention_mask"])).logits


def generate(model, inputs, steps=4):
    out = model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, min_new_tokens=steps, suppress_tokens=[IMAGE_TOKEN]
    )
    return out[:, inputs["input_ids"].shape[1] :]


cases = pytest.mark.parametrize("tower,attn", ADAPTERS, ids=[f"{t}-{a}" for t, a in ADAPTERS])
methods = pytest.mark.parametrize("name", list(METHODS))


# 1. keep-all equivalence -------------------------------------------------------------------------
@cases
@methods
def test_keep_all_equivalence(tower, attn, name):
    spec = METHODS[name]
    model = model_for(tower, attn)
    inputs = batch(TEXTS[:2])
    ref_logits, ref_tokens = unwrapped_reference(tower, attn, inputs)
    handle = wrap_or_skip(model, name, n_patches(), **spec["options"])
    try:
        if not spec["identity"]:
            pytest.skip(f"{name} merges tokens (and VisionZip adds CLS) by design: no identity at full budget")
        torch.testing.assert_close(forward(model, inputs), ref_logits, atol=1e-5, rtol=0)
        assert torch.equal(generate(model, inputs), ref_tokens)
        assert handle.stats["llm_visual_tokens"] == [n_patches()] * 2
    finally:
        handle.unwrap()


# 2. manual equivalence -----------------------------------------------------------------------------
def _by_hand_image_tokens(model, inputs, point, token_index, sel):
    feats, cls = vision_features(model, inputs["pixel_values"])
    proj = model.model.multi_modal_projector
    out = []
    for i, (keep, merged, extra) in enumerate(sel.per_image()):
        in_llm = merged is not None and sel.merged_space == "projected"  # given in LLM space (VFlowOpt)
        rows = feats[i, keep] if merged is None or in_llm else merged
        parts = ([cls[i : i + 1]] if sel.keep_cls else []) + [rows] + ([extra] if extra is not None else [])
        mapped = proj(torch.cat(parts))
        if in_llm:
            at = int(sel.keep_cls)
            mapped = torch.cat([mapped[:at], merged, mapped[at + merged.shape[0] :]])
        out.append(mapped)
    return out


@cases
@methods
def test_manual_equivalence(tower, attn, name):
    spec = METHODS[name]
    model = model_for(tower, attn)
    inputs = batch(TEXTS[:2], seed=1)
    handle = wrap_or_skip(model, name, BUDGET, **spec["options"])
    try:
        with record_selections(handle) as seen:
            pruned = forward(model, inputs)
    finally:
        handle.unwrap()
    if all(rec[0].stage == "encoder" for rec in seen):  # encoder points: rerun the tower by hand per image
        with torch.no_grad():
            tokens = []
            for i in range(inputs["pixel_values"].shape[0]):
                keeps = [(rec[0].layer, rec[2].keep[rec.images.index(i)]) for rec in seen if i in rec.images]
                feats = manual_encoder_features(model, inputs["pixel_values"][i : i + 1], keeps)
                tokens.append(model.model.multi_modal_projector(feats))
            embeds, mask, pos = pruned_prompt(model, inputs, tokens)
            ref = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
        for i in range(ref.shape[0]):
            n = int(mask[i].sum())
            torch.testing.assert_close(pruned[i, -n:], ref[i, -n:], atol=1e-5, rtol=1e-5)
        return
    if len(seen) > 1:  # a multi-point method: rebuild every row by hand through all its points
        with torch.no_grad():
            refs = manual_multistage(
                model, inputs, seen, lambda s: _by_hand_image_tokens(model, inputs, None, None, s),
                renumber=handle.method.llm_positions == "compact",
            )
        for i, ref in enumerate(refs):
            torch.testing.assert_close(pruned[i, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-5)
        return
    (point, token_index, sel), = seen
    with torch.no_grad():
        if point.stage == "projector":
            tokens = _by_hand_image_tokens(model, inputs, point, token_index, sel)
            embeds, mask, pos = pruned_prompt(model, inputs, tokens)
            if handle.method.positions == "original":  # kept tokens keep their positions (CoViPAL)
                pos = _original_positions(inputs, sel, mask)
            ref = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
            for i in range(ref.shape[0]):  # rows are right-aligned in both; compare the real tokens
                n = int(mask[i].sum())
                torch.testing.assert_close(pruned[i, -n:], ref[i, -n:], atol=1e-5, rtol=1e-5)
        else:
            ids = inputs["input_ids"]
            keep_pos = []
            for i in range(ids.shape[0]):
                img = (ids[i] == IMAGE_TOKEN).nonzero().flatten()
                others = (ids[i] != IMAGE_TOKEN).nonzero().flatten()
                keep_pos.append(torch.sort(torch.cat([others, img[sel.keep[i]]])).values)
            ref = manual_llm_prune(model, inputs, point.layer, torch.stack(keep_pos))
            torch.testing.assert_close(pruned, ref, atol=1e-5, rtol=1e-5)


def _original_positions(inputs, sel, new_mask):
    """Position ids of a projector-stage selection that keeps original positions: each row's
    text tokens and kept image tokens at their unpruned positions, right-aligned like
    ``pruned_prompt``'s rows (padding at 0)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pos = torch.zeros_like(new_mask)
    for i, (keep, _, _) in enumerate(sel.per_image()):
        row_ids = ids[i][mask[i].bool()]
        full = torch.arange(row_ids.shape[0])
        img = (row_ids == IMAGE_TOKEN).nonzero().flatten()
        start, end = int(img[0]), int(img[-1]) + 1
        kept = torch.cat([full[:start], full[start + keep], full[end:]])
        pos[i, pos.shape[1] - kept.shape[0] :] = kept
    return pos


# 3. batch equivalence --------------------------------------------------------------------------------
@cases
@methods
def test_batch_equivalence(tower, attn, name):
    spec = METHODS[name]
    if not spec["batch"]:
        pytest.skip(f"{name} draws from one generator per forward: batch and single runs differ by design")
    model = model_for(tower, attn)
    inputs = batch(TEXTS, seed=2)
    handle = wrap_or_skip(model, name, BUDGET, **spec["options"])
    try:
        batched_logits = forward(model, inputs)[:, -1]
        batched_tokens = generate(model, inputs)
        for i in range(len(TEXTS)):
            single = batch([TEXTS[i]], seed=2)
            single["pixel_values"] = inputs["pixel_values"][i : i + 1]
            torch.testing.assert_close(forward(model, single)[0, -1], batched_logits[i], atol=1e-4, rtol=1e-4)
            assert torch.equal(generate(model, single)[0], batched_tokens[i])
    finally:
        handle.unwrap()


# 4. cache equivalence --------------------------------------------------------------------------------
@cases
@methods
def test_cache_equivalence(tower, attn, name):
    spec = METHODS[name]
    model = model_for(tower, attn)
    inputs = batch(TEXTS[:2], seed=3)
    handle = wrap_or_skip(model, name, BUDGET, **spec["options"])
    try:
        with record_selections(handle) as seen:
            cached = generate(model, inputs, steps=5)
    finally:
        handle.unwrap()
    point, token_index, sel = seen[0]
    # several points, or a choice conditioned on the prompt text (CoViPAL: the no-cache loop's
    # prompt grows every step): replay every choice of the prefill
    if len({rec[0] for rec in seen}) > 1 or "text_embedding" in handle.method.needs:
        handle = vlmprune.wrap(model, Replay(seen, handle.method.positions, handle.method.llm_positions), budget=BUDGET)
    elif point.stage == "llm":  # the last token changes every step: replay the prefill's choice
        rows = tuple(tuple(int(token_index[i, k]) for k in sel.keep[i]) for i in range(len(sel.keep)))
        handle = vlmprune.wrap(model, "fixed", budget=BUDGET, indices=rows, stage="llm", layer=point.layer)
    else:
        handle = wrap_or_skip(model, name, BUDGET, **spec["options"])
    try:
        assert torch.equal(greedy_no_cache(model, inputs, 5), cached)
    finally:
        handle.unwrap()


# 5. planted examples are in test_methods.py; 6. unwrap restores -------------------------------------
def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@cases
@methods
def test_unwrap_restores(tower, attn, name):
    model = model_for(tower, attn)
    inputs = batch(TEXTS[:2], seed=4)
    ref = forward(model, inputs)
    before_hooks = _hooks(model)  # after a forward: transformers adds its output-capturing hooks at the first one
    handle = wrap_or_skip(model, name, 8, **METHODS[name]["options"])
    assert _hooks(model) > before_hooks
    pruned = forward(model, inputs)
    assert pruned.shape[1] < ref.shape[1] or name == "fastv"
    handle.unwrap()
    assert _hooks(model) == before_hooks
    assert "get_image_features" not in vars(model.model)
    assert not hasattr(model, "_vlmprune_handle")
    torch.testing.assert_close(forward(model, inputs), ref, atol=0, rtol=0)
    with vlmprune.wrap(model, "uniform", budget=8):
        assert _hooks(model) > before_hooks
    assert _hooks(model) == before_hooks


def test_stats_batch_two_with_padding_budget_64_of_256():
    model = model_for("clip", "sdpa")
    inputs = batch(TEXTS[:2], seed=5)
    assert n_patches() == 256
    with vlmprune.wrap(model, "divprune", budget=64) as handle:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        stats = handle.stats
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert stats["llm_visual_tokens"] == [64, 64]
    assert stats["points"] == [{"point": "projector", "in": [256, 256], "out": [64, 64]}]
    assert 0 < stats["llm_prefill_flops"] < stats["llm_prefill_flops_unpruned"]
    assert stats["kv_bytes_saved"] > 0
    # 192 of 256+7 positions removed per row: KV bytes scale with the sequence length
    full = inputs["input_ids"].shape[1]
    assert stats["kv_cache_bytes"] / stats["kv_cache_bytes_unpruned"] == pytest.approx((full - 192) / full)


def test_llm_stage_counts_and_full_sequence_before_k():
    """FastV: layers < K see every token, layers >= K see text + budget image tokens
    (measured on each decoder layer's output)."""
    model = model_for("clip", "sdpa")
    inputs = batch(TEXTS[:2], seed=6)
    lengths = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, out, i=i: lengths.__setitem__(i, (out[0] if isinstance(out, tuple) else out).shape[1]))
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        with vlmprune.wrap(model, "fastv", budget=BUDGET, k_layer=2) as handle:
            forward(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    full = inputs["input_ids"].shape[1]
    assert lengths == {0: full, 1: full, 2: full - 256 + BUDGET, 3: full - 256 + BUDGET}
    assert handle.stats["points"] == [{"point": "llm:2", "in": [256, 256], "out": [BUDGET, BUDGET]}]
