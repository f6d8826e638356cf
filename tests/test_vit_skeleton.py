"""The plain-ViT skeleton (adapters/vit.py, issue 13 deliverable 2): transformers'
ViTForImageClassification pruned at its boundary by DivPrune, uniform, random and VisionZip with
no method file changed; keep-all identity, batch independence, exact counts, manual equivalence,
planted choices, unwrap, refusals. Tiny models from configs, CPU, eager and sdpa."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import transformers as T

import vlmprune
from adapters.base import check_selection
from adapters.vit import ViTAdapter
from tests.contexts import make_context
from vlmprune.context import ModelInfo, Point, Selection, StageSpec, VLMInfo

DEPTH, SIDE, PATCH = 3, 32, 8
N = (SIDE // PATCH) ** 2  # 16 patches on a 4 x 4 grid
METHODS = ("divprune", "uniform", "random", "visionzip")
IMPLS = ("eager", "sdpa")


@functools.cache
def model_for(impl: str) -> T.ViTForImageClassification:
    torch.manual_seed(0)
    config = T.ViTConfig(hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=4, intermediate_size=64,
                         image_size=SIDE, patch_size=PATCH, num_labels=5)
    model = T.ViTForImageClassification(config).eval()
    model.set_attn_implementation(impl)
    return model


PIXELS = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))


def run(model, pixels=PIXELS):
    """Logits and the final sequence (``last_hidden_state``, CLS first) of one forward."""
    with torch.no_grad():
        return model(pixels).logits, model.vit(pixels).last_hidden_state


def manual(model, pixels, layer: int, keep: torch.Tensor):
    """The unwrapped model's own modules run by hand, patches ``keep`` ([B, k] indices into the
    patches) taken out before block ``layer`` (``DEPTH``: before the final layernorm)."""
    vit = model.vit
    with torch.no_grad():
        h = vit.embeddings(pixels)
        for block in vit.layers[:layer]:
            h = block(h)
        kept = h[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        h = torch.cat([h[:, :1], kept], dim=1)
        for block in vit.layers[layer:]:
            h = block(h)
        h = vit.layernorm(h)
        return model.classifier(h[:, 0]), h


def hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_info_is_a_plain_model_info_with_a_vit_stage_and_a_mid_block_stage():
    adapter = ViTAdapter(model_for("eager"))
    info = adapter.info()
    assert isinstance(info, ModelInfo) and not isinstance(info, VLMInfo)
    spec, mid = info.stages["vit"], info.stages["vit_mlp"]
    assert (info.family, list(info.stages), spec.role, spec.layers, spec.prefix) == ("vit", ["vit", "vit_mlp"], "inside", range(1, 4), 1)
    assert (mid.role, mid.layers, mid.prefix, "sizes" in mid.signals) == ("inside", range(0, 3), 1, True)
    assert (info.default_points, info.grid, info.n_tokens) == ({"boundary": Point("vit", DEPTH)}, (4, 4), N)
    assert adapter.info(1).default_points == {"boundary": Point("vit", 1)} and adapter.info(1).feature_layer == 0
    assert set(spec.signals) == {"hidden", "projected", "cls_attention", "encoder_qkv", "encoder_attention"}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", METHODS)
def test_the_four_boundary_methods_run_unchanged(name, impl):
    """Keep-all is bit-identical (VisionZip's CLS counts towards its budget, so it never keeps all
    and is checked for counts only); pruned counts are exact; a batch equals its images one by one
    (random draws once per forward, so it is left out); unwrap restores."""
    model = model_for(impl)
    before, reference = hooks(model), run(model)
    for layer in (1, DEPTH):
        with vlmprune.wrap(model, name, budget=N, boundary_layer=layer):
            full = run(model)
        if name != "visionzip":
            assert all(torch.equal(a, b) for a, b in zip(full, reference))
        with vlmprune.wrap(model, name, budget=6, boundary_layer=layer):
            logits, hidden = run(model)
            assert hidden.shape == (2, 6 if name == "visionzip" else 1 + 6, 32)
            if name != "random":
                singles = [run(model, PIXELS[i : i + 1]) for i in range(2)]
                torch.testing.assert_close(logits, torch.cat([s[0] for s in singles]), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(hidden, torch.cat([s[1] for s in singles]), rtol=1e-5, atol=1e-5)
        # before the last block the CLS token feels the pruning; after it, CLS pooling does not
        assert torch.allclose(logits, reference[0]) == (layer == DEPTH)
    assert hooks(model) == before and all(torch.equal(a, b) for a, b in zip(run(model), reference))


@pytest.mark.parametrize("impl", IMPLS)
def test_random_and_uniform_keep_the_planted_indices_and_match_the_manual_reference(impl):
    """random: the sorted top-5 of one seed-0 draw per forward; uniform at 4 of a 4 x 4 grid: the
    centres of its four 2 x 2 cells (5, 7, 13, 15). The wrapped outputs equal the unwrapped
    model's modules run by hand without the other patches."""
    model = model_for(impl)
    draw = torch.rand(2, N, generator=torch.Generator().manual_seed(0))
    planted = {"random": (5, torch.sort(draw.topk(5, dim=-1).indices, dim=-1).values),
               "uniform": (4, torch.tensor([[5, 7, 13, 15]] * 2))}
    for name, (budget, want) in planted.items():
        with vlmprune.wrap(model, name, budget=budget, boundary_layer=2) as handle, handle.record() as records:
            logits, hidden = run(model)
        assert [r.point for r in records] == [Point("vit", 2)] * 2  # one select per forward (model, then model.vit)
        keep = records[0].selection.keep
        assert torch.equal(records[0].token_index, torch.arange(N).expand(2, -1)) and torch.equal(keep, want)
        want_logits, want_hidden = manual(model, PIXELS, 2, keep)
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hidden, want_hidden, rtol=1e-5, atol=1e-6)


def test_visionzip_reads_the_cls_attention_of_the_block_before_its_point():
    """VisionZip's scores are the CLS -> patch attention (summed over heads) of block L - 1, as
    the unwrapped eager model reports it; a patch planted to draw the CLS token's attention (its
    position embedding aligned with a block-0 key direction the CLS query favours) is kept."""
    model = copy.deepcopy(model_for("eager"))
    planted = 9
    block = model.vit.layers[0].attention
    with torch.no_grad():
        direction = torch.tensor([1.0, -1.0] * 16)  # zero mean, unit variance: layernorm keeps it
        block.q_proj.weight.zero_()
        block.q_proj.bias.copy_(4 * direction)  # every query, the CLS token's too, is 4 * direction
        block.k_proj.weight.copy_(torch.eye(32))
        block.k_proj.bias.zero_()
        model.vit.embeddings.position_embeddings[0, 1 + planted] += 100 * direction
    with torch.no_grad():
        attentions = model(PIXELS, output_attentions=True).attentions
    for layer in (1, 2):
        cls_to_patches = attentions[layer - 1][:, :, 0, 1:].sum(1)
        with vlmprune.wrap(model, "visionzip", budget=6, boundary_layer=layer) as handle, handle.record() as records:
            model(PIXELS)
        sel = records[0].selection
        torch.testing.assert_close(sel.scores, cls_to_patches, rtol=1e-5, atol=1e-6)
        n_dom = vlmprune.get_method("visionzip")().split(6)[0]
        dominant = torch.sort(cls_to_patches.topk(n_dom, dim=-1).indices, dim=-1).values
        assert torch.equal(sel.keep[:, :n_dom], dominant) and sel.keep_cls
        if layer == 1:  # block 0 holds the plant
            assert (cls_to_patches.argmax(-1) == planted).all() and (sel.keep[:, :n_dom] == planted).any(-1).all()


def test_methods_without_a_boundary_and_bad_points_are_refused():
    model = model_for("eager")
    before = hooks(model)
    with pytest.raises(ValueError, match=r"method 'fastv' acts at stage\(s\) \['llm'\].*it offers \['vit', 'vit_mlp'\]"):
        vlmprune.wrap(model, "fastv", budget=4)
    with pytest.raises(ValueError, match=r"parameter 'boundary_layer' must be an int in \[1, 3\] or None, got 0"):
        vlmprune.wrap(model, "divprune", budget=4, boundary_layer=0)
    with pytest.raises(ValueError, match=r"budget must be in \[1, 16\] tokens per image \(the model has 16\), got 17"):
        vlmprune.wrap(model, "divprune", budget=17)
    # PruMerge+ reads the block after its feature layer, which has not run at the boundary point:
    # refused before any hook is installed, so the next wrap works
    for layer in (None, 2):
        with pytest.raises(ValueError, match=rf"method 'prumerge_plus' reads the attention of block\(s\) \[{layer or 3}\], "
                           rf"which have not run at its last point vit:{layer or 3} \(blocks 0..{(layer or 3) - 1} have\)"):
            vlmprune.wrap(model, "prumerge_plus", budget=0.5, boundary_layer=layer)
    assert hooks(model) == before and not hasattr(model, "_vlmprune_handle")
    with vlmprune.wrap(model, "divprune", budget=4):
        assert run(model)[1].shape[1] == 5
    assert hooks(model) == before
    # Method.check validates the point's layer against the stage's layers
    far = ModelInfo("vit", {"vit": StageSpec("vit", "inside", layers=range(1, 4))}, {"boundary": Point("vit", 9)})
    with pytest.raises(ValueError, match=r"method 'divprune' acts at point 'vit:9'; the vit adapter's stage 'vit' takes layers 1..3"):
        vlmprune.get_method("divprune")().check(far)


def test_capture_layers_name_the_stage_and_keep_cls_is_allowed_where_the_stage_has_a_prefix():
    info = ViTAdapter(model_for("eager")).info(2)
    assert vlmprune.get_method("visionzip")().capture_layers(info) == {"encoder": (), "llm": (), "vit": (1,)}
    x = torch.randn(2, 6, 3)
    sel = Selection(keep=torch.tensor([[0, 1], [2, 3]]), keep_cls=True)
    with_prefix = ModelInfo("vit", {"vit": StageSpec("vit", "inside", prefix=1)})
    assert check_selection(sel, make_context(x, 2, {}, info=with_prefix, stage="vit"), "m") is None
    bare = ModelInfo("vit", {"vit": StageSpec("vit", "inside")})
    with pytest.raises(RuntimeError, match="asked to keep CLS at stage 'vit', which has no prefix token"):
        check_selection(sel, make_context(x, 2, {}, info=bare, stage="vit"), "m")


def test_budget_schedule_keys_name_the_vit_stage():
    """Schedule keys are the adapter's stage names: ``vit:2`` at the boundary moved to block 2;
    a key of a stage or layer the method does not prune at is refused naming its points."""
    model = model_for("eager")
    with vlmprune.wrap(model, "divprune", budget={"vit:2": 5}, boundary_layer=2):
        assert run(model)[1].shape[1] == 6
    with pytest.raises(ValueError, match=r"budget schedule key 'vit:3': method 'divprune' does not prune there; its points are \['vit:2'\]"):
        vlmprune.wrap(model, "divprune", budget={"vit:3": 5}, boundary_layer=2)
    with pytest.raises(ValueError, match=r"budget schedule key 'projector': stage must be one of the stages method 'divprune' prunes at \['vit'\]"):
        vlmprune.wrap(model, "divprune", budget={"projector": 5})
