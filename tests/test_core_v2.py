"""Core v2, moves 1-3 (issue 13): stages named and described by the adapter (StageSpec), methods
that compute their points and needs from the model, a general ModelInfo with the VLM facts in
VLMInfo."""

from __future__ import annotations

import pytest

import vlmprune
from vlmprune.context import ModelInfo, Point, StageSpec, VLMInfo

#: a model that is not a VLM: one boundary stage with a CLS prefix (a plain ViT's last block)
VIT = ModelInfo(
    "vit", {"vit": StageSpec("vit", "boundary", prefix=1)}, {"boundary": Point("vit")}, grid=(4, 4), n_tokens=16
)
#: a CLIP-L LLaVA without an LLM stage (an adapter that prunes in the vision tower only)
NO_LLM = ModelInfo("test", 576, (24, 24), True, 24, 22, 32, ("encoder", "projector"))


def test_point_takes_any_stage_name_and_stage_specs_check_their_fields():
    assert str(Point("unet.down.1", 2)) == "unet.down.1:2" and str(Point("vit")) == "vit"
    with pytest.raises(ValueError, match="stage must be a non-empty stage name"):
        Point("")
    with pytest.raises(ValueError, match=r"role must be one of \('boundary', 'inside', 'output'\), got 'middle'"):
        StageSpec("vit", "middle")
    with pytest.raises(ValueError, match="restore must be one of"):
        StageSpec("unet", "inside", restore="never")
    with pytest.raises(ValueError, match="spaces must include 'tokens'"):
        StageSpec("vit", "boundary", spaces=("projected",))


def test_a_point_at_a_stage_the_model_lacks_is_refused_naming_the_stages_it_offers():
    fixed = vlmprune.get_method("fixed")(indices=((0, 1),), stage="llm", layer=2)
    with pytest.raises(ValueError, match=r"acts at stage\(s\) \['llm'\].*it offers \['vit'\]"):
        fixed.check(VIT)


def test_a_boundary_method_acts_at_the_models_boundary_point():
    """DivPrune, uniform and random name the role, so they act at a ViT's last block unchanged;
    on a VLM the boundary is the projector, as before."""
    for name in ("divprune", "uniform", "random"):
        method = vlmprune.get_method(name)()
        assert method.roles == ("boundary",)
        assert method.points(VIT) == [Point("vit")] and method.check(VIT) is None
        assert method.points(NO_LLM) == [Point("projector")]
    assert vlmprune.get_method("fastv").roles == ("inside",)
    assert vlmprune.get_method("flowcut").roles == ("inside",)
    rows = {m["name"]: m for m in vlmprune.methods()}
    assert rows["divprune"]["roles"] == ["boundary"] and rows["divprune"]["stages"] == ["projector"]
    assert rows["todre"]["roles"] == ["boundary", "inside"]


def test_prefix_requirement_reads_the_stage_spec():
    """VisionZip needs a prefix (CLS) token where it acts: the ViT's boundary has one, a
    CLS-free one does not."""
    visionzip = vlmprune.get_method("visionzip")()
    assert visionzip.requires_prefix(VIT) and visionzip.check(VIT) is None
    no_cls = ModelInfo("vit", {"vit": StageSpec("vit", "boundary")}, {"boundary": Point("vit")})
    with pytest.raises(ValueError, match="needs a CLS token"):
        visionzip.check(no_cls)


def test_flowcut_without_its_llm_stage_runs_on_a_model_without_an_llm_stage():
    """The bug of issue 13: check read the class attribute ``stages`` (encoder, llm) instead of
    ``points(info)``, so ``llm_stage="off"`` was refused on a model without an llm stage."""
    off = vlmprune.get_method("flowcut")(llm_stage="off")
    assert {p.stage for p in off.points(NO_LLM)} == {"encoder"}
    assert off.check(NO_LLM) is None and off.needs == {"encoder_qkv", "cls_attention"}
    with pytest.raises(ValueError, match=r"acts at stage\(s\) \['llm'\]"):
        vlmprune.get_method("flowcut")(llm_stage="on").check(NO_LLM)


def test_needs_are_computed_per_instance_and_model_and_stages_signals_are_checked():
    cls_free = ModelInfo("test", 576, (24, 24), False, 24, 22, 32, ("encoder", "projector", "llm"))
    flowcut = vlmprune.get_method("flowcut")(llm_stage="on")
    assert flowcut.needs_for(NO_LLM) == {"encoder_qkv", "cls_attention", "relay_qkv"}
    assert flowcut.needs_for(cls_free) == {"encoder_qkv", "relay_qkv"}
    assert flowcut.needs == vlmprune.get_method("flowcut").needs  # asking changes nothing
    flowcut.check(cls_free)
    assert flowcut.needs == {"encoder_qkv", "relay_qkv"}  # check records what it validated
    holov = vlmprune.get_method("holov")()
    assert "cls_attention" in holov.needs_for(NO_LLM) and "encoder_attention" not in holov.needs_for(NO_LLM)
    assert "encoder_attention" in holov.needs_for(cls_free) and "cls_attention" not in holov.needs_for(cls_free)
    assert vlmprune.get_method("fopru")(significance="received").needs_for(NO_LLM) == {"encoder_attention"}
    todre = vlmprune.get_method("todre")()
    assert "cls_attention" in todre.needs_for(NO_LLM) and "cls_attention" not in todre.needs_for(cls_free)
    # a stage that declares its signals refuses a method needing another
    plain = ModelInfo("vit", {"vit": StageSpec("vit", "boundary", signals=frozenset({"hidden"}))}, {"boundary": Point("vit")})
    with pytest.raises(ValueError, match=r"needs signal\(s\) \['projected'\].*at stage\(s\) \['vit'\]"):
        vlmprune.get_method("divprune")().check(plain)
    assert vlmprune.get_method("uniform")().check(plain) is None


def test_vlm_info_carries_the_vlm_facts_and_the_vlm_stage_specs():
    info = ModelInfo("qwen2_vl", None, None, False, 32, 31, 28, ("encoder", "projector", "llm"), ("projected",), patches_per_token=4)
    assert type(info) is VLMInfo and isinstance(info, ModelInfo)
    assert (info.n_visual, info.has_cls, info.encoder_layers, info.feature_layer, info.llm_layers) == (None, False, 32, 31, 28)
    assert info.patches_per_token == 4 and info.signals == ("projected",) and info.n_tokens is None
    assert "llm" in info.stages and "cache" not in info.stages and list(info.stages) == ["encoder", "projector", "llm"]
    assert info.default_points == {"boundary": Point("projector")}
    projector, encoder, llm = info.stages["projector"], info.stages["encoder"], info.stages["llm"]
    assert (projector.role, projector.ragged, projector.extra, projector.spaces) == ("boundary", True, True, ("tokens", "projected"))
    assert (encoder.role, encoder.ragged, encoder.extra, encoder.spaces) == ("inside", False, False, ("tokens",))
    assert (llm.role, llm.ragged, llm.extra) == ("inside", True, False)
    by_name = VLMInfo(family="llava", n_visual=16, grid=(4, 4), has_cls=True, encoder_layers=4, feature_layer=2,
                      llm_layers=4, stages=("llm",))
    assert by_name.n_tokens == 16 and by_name.default_points == {} and by_name.stages["llm"].prefix == 0
    assert ModelInfo("test", 16, (4, 4), True, 4, 2, 4, ("encoder", "projector")).stages["projector"].prefix == 1
    assert by_name == VLMInfo("llava", 16, (4, 4), True, 4, 2, 4, ("llm",)) != VLMInfo("llava", 16, (4, 4), False, 4, 2, 4, ("llm",))
    with pytest.raises(ValueError, match=r"unknown VLM stage\(s\) \['vit'\]"):
        ModelInfo("test", 16, (4, 4), True, 4, 2, 4, ("vit",))


def test_check_selection_reads_what_the_stage_allows_from_its_spec():
    """Per-image keep lists, appended tokens, CLS and merge spaces are allowed where the stage's
    spec says so, whatever the stage's name."""
    import torch

    from adapters.base import check_selection
    from tests.contexts import make_context
    from vlmprune.context import Selection

    x = torch.randn(2, 6, 3)
    strict = ModelInfo("vit", {"vit": StageSpec("vit", "boundary")}, {"boundary": Point("vit")}, grid=(2, 3))
    loose = ModelInfo(
        "vit", {"vit": StageSpec("vit", "boundary", ragged=True, extra=True, spaces=("tokens", "projected"))}, grid=(2, 3)
    )
    ragged = Selection(keep=[torch.tensor([0, 2]), torch.tensor([1])])
    summary = Selection(keep=torch.tensor([[0, 1], [2, 3]]), extra=torch.zeros(2, 1, 3))
    projected = Selection(keep=torch.tensor([[0, 1], [2, 3]]), merged=torch.zeros(2, 2, 5), merged_space="projected")
    for sel, match in ((ragged, "per-image keep lists"), (summary, "extra tokens"), (projected, r"accepts \['tokens'\]")):
        with pytest.raises(RuntimeError, match=match):
            check_selection(sel, make_context(x, 2, {}, info=strict, stage="vit"), "m")
        assert check_selection(sel, make_context(x, 2, {}, info=loose, stage="vit"), "m") is None
    llava = ModelInfo("test", 6, (2, 3), True, 4, 2, 4, ("encoder", "projector", "llm"))
    check_selection(ragged, make_context(x, 2, {}, info=llava, stage="llm", layer=2), "m")
    with pytest.raises(RuntimeError, match="per-image keep lists at stage 'encoder'"):
        check_selection(ragged, make_context(x, 2, {}, info=llava, stage="encoder", layer=2), "m")
    scan = ModelInfo("mixer", {"mixer": StageSpec("mixer", "inside", ordered=True)}, grid=(2, 3))
    descending = Selection(keep=torch.tensor([[0, 2], [3, 1]]))
    with pytest.raises(RuntimeError, match="does not ascend at stage 'mixer'"):
        check_selection(descending, make_context(x, 2, {}, info=scan, stage="mixer"), "m")
    assert check_selection(descending, make_context(x, 2, {}, info=strict, stage="vit"), "m") is None


def test_a_prefix_of_registers_only_is_no_cls_token():
    """``StageSpec.cls``: registers alone (timm's ``class_token=False``) fill the prefix but give no
    CLS token, so a CLS method is refused by the core's check; by default a prefix is a CLS token."""
    registers = ModelInfo("vit", {"vit": StageSpec("vit", "boundary", prefix=2, cls=False)}, {"boundary": Point("vit")})
    with pytest.raises(ValueError, match="method 'visionzip' needs a CLS token"):
        vlmprune.get_method("visionzip")().check(registers)
    assert StageSpec("vit", "boundary", prefix=1).has_cls and not StageSpec("vit", "boundary").has_cls
    with_cls = ModelInfo("vit", {"vit": StageSpec("vit", "boundary", prefix=3, cls=True)}, {"boundary": Point("vit")})
    vlmprune.get_method("visionzip")().check(with_cls)
