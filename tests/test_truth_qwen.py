"""Truth tests for the Qwen2-VL / Qwen2.5-VL adapter: variable image sizes in one batch with
padding, 3-D M-RoPE positions gathered for kept tokens, generate() with the cache."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from tests.truth import Replay, record_selections
from tests.tiny import QWEN_IMAGE, qwen_batch, tiny_qwen

VERSIONS = ["2", "2.5"]
METHODS = ["divprune", "uniform", "fastv", "random", "hiprune", "holov", "fopru", "zoo_prune"]  # hiprune, holov, fopru: vision attention
# methods with points inside the LLM (multi-point) that run on Qwen: keep-all (all but ToDRE, whose
# stage 2 halves the tokens at any budget), batch and cache here; their manual checks run on
# LLaVA, which shares the decoder machinery
LLM_METHODS = ["todre", "feather", "transprune", "adatoken3d", "atp"]
# the cards' methods that act in the vision encoder (FlowCut: mean-query relay, pruned before the
# merger, then the last-token relay in the LLM) or carry a vision map into the LLM (VFlowOpt):
# keep-all (FlowCut; VFlowOpt recycles cells even at full budget), batch and cache here; their
# mechanics are checked by hand in test_qwen_encoder.py / test_qwen_signals.py
MULTI_STAGE = ["flowcut", "vflowopt"]
TEXTS = [[10, 11, 12, 13], [20, 21]]
GRIDS = [(16, 16), (12, 16)]  # 64 and 48 merged tokens


_MODELS: dict = {}


def model_for(version):
    if version not in _MODELS:
        _MODELS[version] = tiny_qwen(version)
    return _MODELS[version]


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def generate(model, inputs, steps=4):
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, suppress_tokens=[QWEN_IMAGE])
    return out[:, inputs["input_ids"].shape[1] :]


def no_cache_loop(model, inputs, steps):
    """Greedy loop without cache; like ``generate(min_new_tokens=steps)`` it never picks EOS or
    the image placeholder."""
    inputs = dict(inputs)
    new = []
    for _ in range(steps):
        logits = forward(model, {**inputs, "use_cache": False})[:, -1]
        logits[:, [QWEN_IMAGE, model.config.text_config.eos_token_id]] = float("-inf")
        nxt = logits.argmax(-1, keepdim=True)
        new.append(nxt)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], nxt], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(nxt).int()], 1)
    return torch.cat(new, 1)


def run_qwen_layers(model, embeds, pos3, prunes: dict[int, torch.Tensor]):
    """One unpadded row through the unwrapped Qwen LLM, layer by layer; before layer ``K`` in
    ``prunes`` only the sequence positions ``prunes[K]`` stay, each with its own 3-D M-RoPE
    position (RoPE from the gathered positions). Returns logits ``[L', V]``."""
    lm = model.model.language_model
    hidden = embeds
    for i, layer in enumerate(lm.layers):
        if i in prunes:
            hidden, pos3 = hidden[:, prunes[i]], pos3[:, :, prunes[i]]
        cos_sin = lm.rotary_emb(hidden, pos3)
        hidden = layer(hidden, attention_mask=None, position_embeddings=cos_sin)  # causal (no padding)
    return model.lm_head(lm.norm(hidden))[0]


versions = pytest.mark.parametrize("version", VERSIONS)
methods = pytest.mark.parametrize("name", METHODS)


@versions
@pytest.mark.parametrize("name", METHODS + ["flowcut", "feather", "transprune", "adatoken3d", "atp"])
def test_keep_all_equivalence(version, name):
    model = model_for(version)
    inputs = qwen_batch(TEXTS, GRIDS)
    ref, ref_tokens = forward(model, inputs), generate(model, inputs)
    with vlmprune.wrap(model, name, budget=1.0) as handle:
        torch.testing.assert_close(forward(model, inputs), ref, atol=1e-5, rtol=0)
        assert torch.equal(generate(model, inputs), ref_tokens)
    assert handle.stats["llm_visual_tokens"] == [64, 48]


@versions
@methods
def test_manual_equivalence_with_3d_positions(version, name):
    """Pruned logits equal the unwrapped model run on the prompt with the dropped image tokens
    removed by hand and every kept token at its original (t, h, w) M-RoPE position."""
    if name == "fastv":
        pytest.skip("inside the LLM: test_manual_llm_points_with_3d_positions")
    model = model_for(version)
    inputs = qwen_batch(TEXTS, GRIDS, seed=1)
    with vlmprune.wrap(model, name, budget=0.25) as handle:
        with record_selections(handle) as seen:
            pruned = forward(model, inputs)
    keeps = {}
    for point, token_index, sel in seen:  # one call per image size
        for j, keep in enumerate(sel.keep):
            keeps.setdefault(token_index.shape[1], []).append(keep)
    core = model.model
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        pos, _ = core.get_rope_index(ids, image_grid_thw=inputs["image_grid_thw"], attention_mask=mask, mm_token_type_ids=inputs["mm_token_type_ids"])
        feats = core.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        emb = core.get_input_embeddings()(ids).masked_scatter((ids == QWEN_IMAGE)[..., None], torch.cat(feats))
    rows = []
    for i in range(2):
        img = (ids[i] == QWEN_IMAGE).nonzero().flatten()
        keep = keeps[img.numel()].pop(0)
        everything = torch.arange(ids.shape[1])  # the kept image tokens in the method's order (HoloV's is its own)
        rows.append(torch.cat([everything[: int(img[0])], img[keep], everything[int(img[-1]) + 1 :]]))
    longest = max(r.numel() for r in rows)
    embeds = emb.new_zeros(2, longest, emb.shape[-1])
    new_mask = torch.zeros(2, longest, dtype=torch.long)
    new_pos = torch.zeros(3, 2, longest, dtype=torch.long)
    for i, r in enumerate(rows):
        embeds[i, longest - r.numel() :] = emb[i, r]
        new_mask[i, longest - r.numel() :] = mask[i, r]
        new_pos[:, i, longest - r.numel() :] = pos[:, i, r]
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=new_mask, position_ids=new_pos).logits
    for i, r in enumerate(rows):
        n = int(mask[i, r].sum())
        torch.testing.assert_close(pruned[i, -n:], ref[i, -n:], atol=1e-5, rtol=1e-5)
    assert handle.stats["llm_visual_tokens"] == [16, 12]


@versions
@pytest.mark.parametrize("name", ["fastv", "feather", "transprune", "adatoken3d", "atp", "todre", "vflowopt"])
def test_manual_llm_points_with_3d_positions(version, name):
    """Methods pruning inside the LLM (after a projector point for ToDRE and VFlowOpt, whose
    recycled values replace the kept tokens' features): each row rebuilt by hand, the unwrapped
    LLM run layer by layer, dropping before each recorded point the image tokens it did not
    keep; every token keeps its own 3-D M-RoPE position (Qwen: original positions, whatever the
    method's ``llm_positions``)."""
    model = model_for(version)
    inputs = qwen_batch(TEXTS, GRIDS, seed=1)
    with vlmprune.wrap(model, name, budget=0.25) as handle, record_selections(handle) as seen:
        pruned = forward(model, inputs)
    assert {rec[0].stage for rec in seen} <= {"projector", "llm"}
    core = model.model
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        pos, _ = core.get_rope_index(ids, image_grid_thw=inputs["image_grid_thw"], attention_mask=mask, mm_token_type_ids=inputs["mm_token_type_ids"])
        feats = torch.cat(list(core.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output))
        emb = core.get_input_embeddings()(ids).masked_scatter((ids == QWEN_IMAGE)[..., None], feats)
        for i in range(2):
            real = mask[i].bool()
            row = emb[i][real].clone()
            visual = (ids[i][real] == QWEN_IMAGE).nonzero().flatten()
            length, prunes = int(real.sum()), {}
            for rec in seen:
                if i not in rec.images:
                    continue
                keep, merged, _ = rec[2].per_image()[rec.images.index(i)]
                if merged is not None:  # projector point: LLM-space values of the kept tokens
                    row[visual[keep]] = merged.to(row.dtype)
                keep = torch.sort(keep).values
                others = torch.ones(length, dtype=torch.bool)
                others[visual] = False
                kept = torch.sort(torch.cat([others.nonzero().flatten(), visual[keep]])).values
                prunes[0 if rec[0].stage == "projector" else rec[0].layer] = kept
                visual, length = torch.searchsorted(kept, visual[keep]), kept.numel()
            assert len(prunes) == len(handle.method.points(handle.adapter.info()))
            ref = run_qwen_layers(model, row[None], pos[:, i : i + 1, real], prunes)
            torch.testing.assert_close(pruned[i, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-5)


@versions
@pytest.mark.parametrize("name", METHODS + LLM_METHODS + MULTI_STAGE)
def test_batch_of_different_image_sizes_equals_single_runs(version, name):
    if name == "random":
        pytest.skip("random draws from one generator per forward: batch and single runs differ by design")
    model = model_for(version)
    inputs = qwen_batch(TEXTS, GRIDS, seed=2)
    with vlmprune.wrap(model, name, budget=0.25):
        batched, tokens = forward(model, inputs)[:, -1], generate(model, inputs)
        for i in range(2):
            single = qwen_batch([TEXTS[i]], [GRIDS[i]], seed=2)
            start = sum(h * w for h, w in GRIDS[:i])
            single["pixel_values"] = inputs["pixel_values"][start : start + GRIDS[i][0] * GRIDS[i][1]]
            torch.testing.assert_close(forward(model, single)[0, -1], batched[i], atol=1e-4, rtol=1e-4)
            assert torch.equal(generate(model, single)[0], tokens[i])


@versions
@pytest.mark.parametrize("name", METHODS + MULTI_STAGE + LLM_METHODS)
def test_cache_equivalence(version, name):
    """Cached generate() equals the no-cache greedy loop; methods with points inside the LLM (or
    several points) choose from the prompt's last token, which the loop changes every step, so
    the loop replays the prefill's choices (encoder, projector and LLM points alike)."""
    model = model_for(version)
    inputs = qwen_batch(TEXTS, GRIDS, seed=3)
    with vlmprune.wrap(model, name, budget=0.25) as handle, record_selections(handle) as seen:
        cached = generate(model, inputs, 5)
    if any(rec[0].stage == "llm" for rec in seen):
        handle = vlmprune.wrap(model, Replay(seen, "original"), budget=0.25)
    else:
        handle = vlmprune.wrap(model, name, budget=0.25)
    with handle:
        assert torch.equal(no_cache_loop(model, inputs, 5), cached)


@versions
def test_unwrap_restores_and_cls_methods_refused(version):
    model = model_for(version)
    inputs = qwen_batch(TEXTS, GRIDS, seed=4)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    ref = forward(model, inputs)
    handle = vlmprune.wrap(model, "divprune", budget=8)
    assert forward(model, inputs).shape[1] < ref.shape[1]
    handle.unwrap()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    torch.testing.assert_close(forward(model, inputs), ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="needs a CLS token"):
        vlmprune.wrap(model, "visionzip", budget=8)
    with pytest.raises(ValueError, match=r"budget must be in \[1, 48\]"):
        with vlmprune.wrap(model, "divprune", budget=60):
            forward(model, inputs)
    with pytest.raises(ValueError, match=r"'positions': the qwen2.*adapter offers \['original'\]"):
        vlmprune.wrap(model, "divprune", budget=8, positions="compact")
    with vlmprune.wrap(model, "divprune", budget=8, positions="original"):  # what it does anyway
        forward(model, inputs)
