"""The public API: metadata, bad input with clear errors, signals computed from q/k match
eager attention, and the encoder stage checked by hand."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import vlmprune
from vlmprune import Method, Point, Selection
from tests.tiny import IMAGE_TOKEN, batch, n_patches, tiny_llava, tiny_qwen
from tests.truth import Replay, full_embeddings, greedy_no_cache, positions_from_mask, pruned_prompt, record_selections, run_layers

BASELINES = {"random", "uniform", "fastv", "visionzip", "divprune", "prumerge_plus"}


@pytest.fixture(scope="module")
def clip():
    return tiny_llava("clip", "sdpa")


def test_methods_lists_baselines_with_metadata():
    listed = {m["name"]: m for m in vlmprune.methods()}
    assert BASELINES <= set(listed)
    fastv = listed["fastv"]
    assert fastv["stages"] == ["llm"] and fastv["needs"] == ["text_attention"]
    assert fastv["paper"]["arxiv"] == "2403.06764" and fastv["training_free"] is True
    assert fastv["options"]["k_layer"]["default"] == 2
    assert listed["visionzip"]["requires_cls"] is True
    assert [m["name"] for m in vlmprune.methods("div*")] == ["divprune"]
    assert all("llm" in m["stages"] for m in vlmprune.methods(stage="llm"))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(method="nope", budget=8), ValueError, "unknown method 'nope'; valid choices"),
        (dict(method="divprune", budget=0), ValueError, r"budget must be in \[1, 256\]"),
        (dict(method="divprune", budget=257), ValueError, r"budget must be in \[1, 256\]"),
        (dict(method="divprune", budget=1.5), ValueError, r"fraction must be in \(0, 1\]"),
        (dict(method="divprune", budget=True), TypeError, "budget must be an int"),
        (dict(method="divprune", budget="64"), TypeError, "budget must be an int"),
        (dict(method="divprune", budget=None), ValueError, "budget is required"),
        (dict(method="divprune", budget={"llm:x": 3}), ValueError, "invalid literal"),
        (dict(method="divprune", budget={"vision": 3}), ValueError, "stage must be one of"),
        (dict(method="fastv", budget=8, k=2), TypeError, r"unknown option\(s\) \['k'\] for method 'fastv'; valid options"),
        (dict(method="fastv", budget=8, k_layer="2"), TypeError, "option 'k_layer' of method 'fastv' must be of type int"),
        (dict(method="fastv", budget=8, k_layer=9), ValueError, r"'k_layer' of method 'fastv' must be in \[1, 3\]"),
        (dict(method="fixed", budget=8, indices=(1,), stage="vision"), ValueError, "must be one of"),
        (dict(method="uniform", budget=8, positions="kept"), ValueError, "parameter 'positions' must be one of"),
        (dict(method="fastv", budget=8, positions="compact"), ValueError, "'positions'.*prunes only inside the LLM"),
        (dict(method="fastv", budget=8, llm_positions="kept"), ValueError, "parameter 'llm_positions' must be one of"),
        (dict(method="divprune", budget=8, llm_positions="compact"), ValueError, "'llm_positions'.*no point inside the LLM"),
    ],
)
def test_bad_input_is_refused_before_touching_the_model(clip, kwargs, error, match):
    hooks = sum(len(m._forward_pre_hooks) for m in clip.modules())
    with pytest.raises(error, match=match):
        vlmprune.wrap(clip, **kwargs)
    assert sum(len(m._forward_pre_hooks) for m in clip.modules()) == hooks
    assert not hasattr(clip, "_vlmprune_handle")


def test_model_without_adapter():
    with pytest.raises(ValueError, match="no adapter knows this model.*supported model types: \\['colpali', 'colqwen2', 'llava', 'llava_next', 'pi0', 'qwen2_5_vl', 'qwen2_vl', 'unet', 'vim', 'vit'\\]"):
        vlmprune.wrap(nn.Linear(2, 2), "divprune", budget=8)


def test_cls_method_on_siglip_and_double_wrap(clip):
    with pytest.raises(ValueError, match="needs a CLS token"):
        vlmprune.wrap(tiny_llava("siglip"), "visionzip", budget=8)
    handle = vlmprune.wrap(clip, "uniform", budget=8)
    with pytest.raises(RuntimeError, match="already wrapped"):
        vlmprune.wrap(clip, "divprune", budget=8)
    handle.unwrap()
    handle.unwrap()  # idempotent


def test_llm_stage_refuses_unsupported_attention():
    model = tiny_llava("clip", "sdpa")
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        vlmprune.wrap(model, "fastv", budget=8)


def test_fraction_budget_resolves_per_image(clip):
    with vlmprune.wrap(clip, "divprune", budget=0.25) as handle:
        with torch.no_grad():
            clip(**batch([[10, 11]]))
    assert handle.stats["llm_visual_tokens"] == [64]


def test_schedule_budget(clip):
    budget = {"projector": 32}
    with vlmprune.wrap(clip, "uniform", budget=budget) as handle:
        with torch.no_grad():
            clip(**batch([[10, 11]]))
    assert handle.stats["llm_visual_tokens"] == [32]


@dataclass
class _Probe(Method):
    """Test-only: records signals at one point and keeps everything (or ``keep``)."""

    name = "probe"
    stages = ("llm",)
    where: Point = None
    keep: tuple = ()

    def points(self, info):
        return [self.where]

    def capture_layers(self, info):
        if self.where.stage == "llm":
            return {"encoder": (), "llm": (self.where.layer - 1,)}
        return {"encoder": (info.feature_layer, 0), "llm": ()}

    def check(self, info):
        pass

    def select(self, ctx):
        self.seen = ctx
        if self.where.stage == "llm":
            self.text = ctx.signals.text_attention(query="last")
            self.instr = ctx.signals.text_attention(query="instruction")
            self.relay = ctx.signals.relay_qkv()
        else:
            self.cls = ctx.signals.cls_attention()
            self.cls0 = ctx.signals.cls_attention(layer=0)
        keep = torch.tensor(self.keep) if self.keep else torch.arange(ctx.n)
        return Selection(keep=keep.expand(ctx.tokens.shape[0], -1).clone())


def test_llm_attention_rows_match_eager_attentions():
    model = tiny_llava("clip", "eager")
    inputs = batch([[10, 11, 12], [20]], seed=3)
    pos = positions_from_mask(inputs["attention_mask"])
    with torch.no_grad():
        ref = model(**inputs, position_ids=pos, output_attentions=True).attentions[1]  # layer K-1 = 1
    probe = _Probe(where=Point("llm", 2))
    with vlmprune.wrap(model, probe, budget=n_patches()):
        with torch.no_grad():
            model(**inputs, position_ids=pos)
    ids = inputs["input_ids"]
    for i in range(2):
        img = (ids[i] == IMAGE_TOKEN).nonzero().flatten()
        want = ref[i, :, -1, img].mean(0)
        torch.testing.assert_close(probe.text[i], want, atol=1e-5, rtol=1e-4)
        after = torch.arange(int(img[-1]) + 1, ids.shape[1])
        torch.testing.assert_close(probe.instr[i], ref[i][:, after][:, :, img].mean(0).mean(0), atol=1e-5, rtol=1e-4)


def test_relay_qkv_is_the_last_token_and_image_rows_of_the_layer():
    """``relay_qkv`` (FlowCut's LLM relay): q/k reproduce the eager model's last-token attention
    over the image (renormalised), v is the layer's value projection, kv heads repeated."""
    model = tiny_llava("clip", "eager")
    inputs = batch([[10, 11, 12], [20]], seed=3)
    pos = positions_from_mask(inputs["attention_mask"])
    values = {}
    hook = model.model.language_model.layers[1].self_attn.v_proj.register_forward_hook(
        lambda mod, args, out: values.setdefault("v", out.detach())
    )
    with torch.no_grad():
        ref = model(**inputs, position_ids=pos, output_attentions=True).attentions[1]
    hook.remove()
    probe = _Probe(where=Point("llm", 2))
    with vlmprune.wrap(model, probe, budget=n_patches()):
        with torch.no_grad():
            model(**inputs, position_ids=pos)
    q, k, v = probe.relay
    heads, kv_heads = model.config.text_config.num_attention_heads, model.config.text_config.num_key_value_heads
    n = n_patches()
    assert q.shape == k.shape == v.shape == (2, heads, 1 + n, 16)
    ids = inputs["input_ids"]
    for i in range(2):
        img = (ids[i] == IMAGE_TOKEN).nonzero().flatten()
        want = ref[i, :, -1, img] / ref[i, :, -1, img].sum(-1, keepdim=True)
        got = (q[i, :, :1] @ k[i, :, 1:].transpose(-1, -2) / 4.0).softmax(-1)[:, 0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        rows = torch.cat([torch.tensor([ids.shape[1] - 1]), img])
        by_hand = values["v"][i, rows].view(1 + n, kv_heads, 16).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        torch.testing.assert_close(v[i], by_hand, atol=1e-6, rtol=1e-5)


def test_encoder_cls_attention_matches_eager_vision_attentions():
    model = tiny_llava("clip", "eager")
    inputs = batch([[10]], seed=4)
    with torch.no_grad():
        att = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    probe = _Probe(where=Point("projector"))
    with vlmprune.wrap(model, probe, budget=n_patches()):
        with torch.no_grad():
            model(**inputs)
    layer = model.config.vision_feature_layer % 5 - 1
    torch.testing.assert_close(probe.cls, att[layer][:, :, 0, 1:].mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probe.cls0, att[0][:, :, 0, 1:].mean(1), atol=1e-6, rtol=1e-5)


def test_encoder_stage_manual_equivalence():
    """Pruning before vision block 1 equals running the blocks by hand on the kept tokens."""
    model = tiny_llava("clip", "sdpa")
    inputs = batch([[10, 11], [20, 21, 22]], seed=5)
    keep = tuple(range(0, 256, 5))
    probe = _Probe(where=Point("encoder", 1), keep=keep)
    with vlmprune.wrap(model, probe, budget=n_patches()) as handle:
        with torch.no_grad():
            pruned = model(**inputs, position_ids=positions_from_mask(inputs["attention_mask"])).logits
    assert handle.stats["points"][0] == {"point": "encoder:1", "in": [256, 256], "out": [len(keep)] * 2}
    vm = model.model.vision_tower
    with torch.no_grad():
        h = vm.pre_layrnorm(vm.embeddings(inputs["pixel_values"]))
        idx = torch.tensor((0,) + tuple(k + 1 for k in keep))
        for i, layer in enumerate(vm.encoder.layers[:3]):
            if i == 1:
                h = h[:, idx]
            h = layer(h, None)
        tokens = [model.model.multi_modal_projector(h[j, 1:]) for j in range(2)]
        embeds, mask, pos = pruned_prompt(model, inputs, tokens)
        ref = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
    for i in range(2):
        n = int(mask[i].sum())
        torch.testing.assert_close(pruned[i, -n:], ref[i, -n:], atol=1e-5, rtol=1e-5)


def test_labels_follow_the_pruned_sequence(clip):
    """With labels, the loss is computed on the pruned sequence: it equals the shifted
    cross-entropy of the pruned logits against the labels with the dropped slots removed."""
    inputs = batch([[10, 11, 12, 13]], seed=6)
    labels = inputs["input_ids"].clone()
    labels[labels == IMAGE_TOKEN] = -100
    with vlmprune.wrap(clip, "uniform", budget=16):
        out = clip(**inputs, labels=labels)
    span = (inputs["input_ids"][0] == IMAGE_TOKEN).nonzero().flatten()
    kept = torch.cat([labels[0, : int(span[0]) + 16], labels[0, int(span[-1]) + 1 :]])
    assert out.logits.shape[1] == kept.numel()
    want = torch.nn.functional.cross_entropy(out.logits[0, :-1], kept[1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, want)


def test_positions_override_numbers_kept_tokens_as_asked(clip):
    """``wrap(positions="original")``: the pruned model equals the unpruned one with the dropped
    image tokens masked out of attention and every token at its unpruned position; the method's
    own numbering (``fixed`` at the projector: compact) differs from it."""
    inputs = batch([[10, 11, 12, 13], [20, 21]])
    keep = tuple(range(0, n_patches(), 5))
    image_slots = (inputs["input_ids"] == IMAGE_TOKEN).nonzero()[:, 1].view(2, -1)
    masked = inputs["attention_mask"].clone()
    dropped = [j for j in range(n_patches()) if j not in keep]
    masked.scatter_(1, image_slots[:, dropped], 0)
    with torch.no_grad():
        ref = clip(**{**inputs, "attention_mask": masked},
                   position_ids=positions_from_mask(inputs["attention_mask"])).logits[:, -1]
        with vlmprune.wrap(clip, "fixed", budget=len(keep), indices=keep, positions="original"):
            original = clip(**inputs).logits[:, -1]
        with vlmprune.wrap(clip, "fixed", budget=len(keep), indices=keep):
            compact = clip(**inputs).logits[:, -1]
    torch.testing.assert_close(original, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(compact, ref, atol=1e-3)


def test_llm_positions_compact_renumbers_from_the_point_on(clip):
    """``wrap(llm_positions="compact")`` on FastV (official: original positions): from layer K on
    the kept sequence is numbered without gaps (the by-hand run renumbers and recomputes RoPE),
    layers before K keep the unpruned numbering, and cached decoding equals the no-cache loop
    replaying the prefill's choice."""
    inputs = batch([[10, 11, 12, 13], [20, 21]], seed=6)
    with vlmprune.wrap(clip, "fastv", budget=32, llm_positions="compact") as handle, record_selections(handle) as seen:
        with torch.no_grad():
            pruned = clip(**inputs, position_ids=positions_from_mask(inputs["attention_mask"])).logits
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    (point, token_index, sel), = seen
    for i in range(2):
        real = mask[i].bool()
        img = (ids[i][real] == IMAGE_TOKEN).nonzero().flatten()
        keep = torch.sort(torch.cat([(ids[i][real] != IMAGE_TOKEN).nonzero().flatten(), img[sel.keep[i]]])).values
        n = int(real.sum())
        row = {k: v[i : i + 1, -n:] if v.dim() == 2 else v[i : i + 1] for k, v in inputs.items()}
        with torch.no_grad():
            emb = full_embeddings(clip, row)
            renumbered = run_layers(clip, emb, torch.ones(1, n, dtype=torch.long), torch.arange(n)[None], {point.layer: keep[None]}, renumber=True)
            original = run_layers(clip, emb, torch.ones(1, n, dtype=torch.long), torch.arange(n)[None], {point.layer: keep[None]})
        torch.testing.assert_close(pruned[i, -keep.numel() :], renumbered[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(renumbered, original, atol=1e-3)
    with vlmprune.wrap(clip, "fastv", budget=32, llm_positions="compact") as handle, record_selections(handle) as seen:
        cached = clip.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    with vlmprune.wrap(clip, Replay(seen, "compact", "compact"), budget=32):
        assert torch.equal(greedy_no_cache(clip, inputs, 4), cached[:, ids.shape[1] :])
    with pytest.raises(ValueError, match=r"'llm_positions': the qwen2_vl adapter offers \['original'\]"):
        vlmprune.wrap(tiny_qwen("2"), "fastv", budget=8, llm_positions="compact")


def test_handle_record_lists_every_select_call(clip):
    """``handle.record()``: one SelectionRecord per ``select`` call while the block runs (nested
    recorders each get every call), nothing after it; the model's output is unchanged."""
    inputs = batch([[10, 11], [20]], seed=7)
    with vlmprune.wrap(clip, "todre", budget=24) as handle:
        with torch.no_grad():
            plain = clip(**inputs).logits
            with handle.record() as outer:
                with handle.record() as inner:
                    recorded = clip(**inputs).logits
                clip(**inputs)
            clip(**inputs)
    torch.testing.assert_close(recorded, plain, atol=0, rtol=0)
    assert [str(r.point) for r in inner] == ["projector", "llm:3"] and len(outer) == 4  # ToDRE: stage 2 before 7L/8 = 3 of 4
    first = inner[0]
    assert isinstance(first, vlmprune.SelectionRecord) and first.grid == (16, 16) and first.images == (0, 1)
    kept = first.selection.keep.shape[1]
    assert first.token_index.shape == (2, n_patches()) and kept < n_patches()
    assert torch.equal(inner[1].token_index, first.token_index.gather(1, first.selection.keep))  # raster ids follow
    assert not handle._plan.recorders
