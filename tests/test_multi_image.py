"""Several images in one prompt, in a padded batch: each image keeps its own budget, and
the result equals the unwrapped model on the prompt with the dropped tokens removed by hand."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from tests.tiny import IMAGE_TOKEN, PAD, QWEN_END, QWEN_START, n_patches, qwen_prompt_with_images, tiny_llava, tiny_qwen
from tests.truth import positions_from_mask, pruned_prompt, record_selections, vision_features


def _two_image_batch():
    n = n_patches()
    rows = [
        [1] + [IMAGE_TOKEN] * n + [10, 11] + [IMAGE_TOKEN] * n + [12],
        [1, 20] + [IMAGE_TOKEN] * n + [21],
    ]
    longest = max(map(len, rows))
    ids = torch.tensor([[PAD] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def test_llava_two_images_in_one_prompt():
    model = tiny_llava("clip")
    inputs = _two_image_batch()
    pos = positions_from_mask(inputs["attention_mask"])
    with vlmprune.wrap(model, "divprune", budget=20) as handle:
        with record_selections(handle) as seen:
            with torch.no_grad():
                pruned = model(**inputs, position_ids=pos).logits
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    assert handle.stats["llm_visual_tokens"] == [20, 20, 20]
    (_, _, sel), = seen
    feats, _ = vision_features(model, inputs["pixel_values"])
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        tokens = [proj(feats[i, sel.keep[i]]) for i in range(3)]
        # row 0 holds images 0 and 1 with text between them; pruned_prompt handles one span, so
        # build row 0 by hand around both spans
        emb = model.model.get_input_embeddings()(inputs["input_ids"])
        ids = inputs["input_ids"][0]
        spans = (ids == IMAGE_TOKEN).nonzero().flatten()
        first, second = spans[: n_patches()], spans[n_patches() :]
        row0 = torch.cat([emb[0, : int(first[0])], tokens[0], emb[0, int(first[-1]) + 1 : int(second[0])], tokens[1], emb[0, int(second[-1]) + 1 :]])
        single = {k: v[1:] for k, v in inputs.items() if k != "pixel_values"}
        e1, m1, p1 = pruned_prompt(model, single, [tokens[2]])
        ref0 = model(inputs_embeds=row0[None], position_ids=torch.arange(row0.shape[0])[None]).logits[0]
        ref1 = model(inputs_embeds=e1, attention_mask=m1, position_ids=p1).logits[0]
    torch.testing.assert_close(pruned[0, -ref0.shape[0] :], ref0, atol=1e-5, rtol=1e-5)
    n1 = int(m1.sum())
    torch.testing.assert_close(pruned[1, -n1:], ref1[-n1:], atol=1e-5, rtol=1e-5)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("name", ["divprune", "zoo_prune", "flowcut", "vflowopt"])
def test_qwen_two_images_in_one_prompt_of_different_sizes(name):
    """Each image of one prompt is pruned on its own: its own fraction (FlowCut: twice the budget
    into the LLM, then the budget before layer 2; VFlowOpt: its average over the LLM layers)."""
    model = tiny_qwen("2")
    inputs = qwen_prompt_with_images([(16, 16), (12, 16)], [10, 11], [1, 2])  # <s> img1 10 img2 11
    ids = inputs["input_ids"]
    assert int((ids == QWEN_START).sum()) == 2 and int((ids == QWEN_END).sum()) == 2
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    if name != "vflowopt":  # VFlowOpt recycles cells even at full budget
        with vlmprune.wrap(model, name, budget=1.0):
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), ref)
    with vlmprune.wrap(model, name, budget=0.5) as handle:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    if name == "flowcut":  # the two images' llm-stage calls are separate (different counts)
        outs = sorted(o for p in handle.stats["points"] if p["point"] == "llm:2" for o in p["out"])
        assert handle.stats["llm_visual_tokens"] == [64, 48] and outs == [24, 32]
    elif name == "vflowopt":
        entering = handle.stats["llm_visual_tokens"]
        assert 32 < entering[0] < 64 and 24 < entering[1] < 48  # more than the average enters the LLM
    else:
        assert handle.stats["llm_visual_tokens"] == [32, 24]
