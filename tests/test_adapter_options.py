"""Adapter-owned options and cost (issue #13, move 6): ``wrap()`` routes each keyword to the
method's options or the adapter's (``Adapter.options``), refuses a name both take or neither
takes, and ``handle.stats`` gets its cost figures from ``Adapter.cost``."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from vlmprune.adapters import LlavaAdapter, QwenVLAdapter
from vlmprune.adapters.base import AdapterOption
from vlmprune.stats import Stats

from .tiny import batch, tiny_llava, tiny_qwen

COST_KEYS = ("llm_prefill_flops", "llm_prefill_flops_unpruned", "flops_saved", "kv_cache_bytes",
             "kv_cache_bytes_unpruned", "kv_bytes_saved")


@pytest.fixture(scope="module")
def clip():
    return tiny_llava("clip", "sdpa")


def test_keywords_go_to_the_method_or_the_adapter(clip):
    with vlmprune.wrap(clip, "fastv", budget=8, k_layer=1, llm_positions="compact") as handle:
        assert handle.method.k_layer == 1
        assert handle._plan.adapter_options == {"positions": None, "llm_positions": "compact"}
        assert handle.adapter.runtime.llm_positions_mode() == "compact"
    uniform = vlmprune.get_method("uniform")()
    with vlmprune.wrap(clip, uniform, budget=8, positions="original") as handle:  # an instance takes them too
        assert handle.method is uniform
        assert handle.adapter.runtime.positions_mode() == "original"
    with vlmprune.wrap(clip, "uniform", budget=8) as handle:  # not given: the method's choice
        assert handle._plan.adapter_options == {"positions": None, "llm_positions": None}
        assert handle.adapter.runtime.positions_mode() == "compact"


def test_a_name_both_take_is_refused(clip, monkeypatch):
    monkeypatch.setattr(LlavaAdapter, "options", {**LlavaAdapter.options, "k_layer": AdapterOption(("1",), "test")})
    with pytest.raises(TypeError, match=r"option\(s\) \['k_layer'\] are both options of method 'fastv' and of the "
                                        r"LlavaAdapter adapter"):
        vlmprune.wrap(clip, "fastv", budget=8, k_layer=1)
    assert not hasattr(clip, "_vlmprune_handle")


def test_an_unknown_name_lists_both_options(clip):
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['postions'\] for method 'fastv'; valid options: "
                                        r"\[.*'k_layer'.*\]; the LlavaAdapter adapter's options: "
                                        r"\['positions', 'llm_positions'\]"):
        vlmprune.wrap(clip, "fastv", budget=8, postions="original")
    assert not hasattr(clip, "_vlmprune_handle")


def test_an_option_the_adapter_does_not_offer(monkeypatch):
    model = tiny_qwen("2")
    with pytest.raises(ValueError, match=r"parameter 'positions': the qwen2_vl adapter offers \['original'\], "
                                         r"not 'compact'"):
        vlmprune.wrap(model, "divprune", budget=8, positions="compact")
    monkeypatch.setattr(QwenVLAdapter, "options", {})  # an adapter without options: positions is no core keyword
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['positions'\] for method 'divprune'.*"
                                        r"the QwenVLAdapter adapter's options: \[\]"):
        vlmprune.wrap(model, "divprune", budget=8, positions="original")
    assert not hasattr(model, "_vlmprune_handle")


def test_cost_gives_the_stats_figures(clip):
    with vlmprune.wrap(clip, "uniform", budget=8) as handle:
        assert handle.adapter.cost(handle._stats) == {}  # before any prefill
        assert not set(COST_KEYS) & set(handle.stats)
        with torch.no_grad():
            clip(**batch([[10, 11, 12], [20, 21]]))
        cost = handle.adapter.cost(handle._stats)
        assert list(cost) == list(COST_KEYS)
        assert cost == {k: handle.stats[k] for k in COST_KEYS}
        assert cost["flops_saved"] > 0 and cost["kv_bytes_saved"] > 0


def test_stats_report_whatever_the_adapter_counts():
    """Another family's adapter (a ViT's GFLOPs, a retriever's bytes per document) reports its own figures."""
    stats = Stats(cost=lambda s: {"vit_gflops": 1.5 * s.prefills})
    stats.begin()
    assert stats.as_dict()["vit_gflops"] == 1.5
    assert vlmprune.adapters.Adapter.cost(None, stats) == {}


@pytest.mark.parametrize("build", [lambda: tiny_llava("clip", "sdpa"), tiny_qwen], ids=["llava", "qwen"])
def test_llm_points_need_sdpa_or_eager_attention_checked_by_the_adapter(build):
    """The attention-implementation check of points inside the LLM is the VLM adapters'
    (``Adapter.check_plan``): refused for FastV under flex attention, a projector method passes."""
    model = build()
    model.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"method 'fastv' prunes inside the LLM.*'flex_attention'"):
        vlmprune.wrap(model, "fastv", budget=8)
    vlmprune.wrap(model, "divprune", budget=8).unwrap()
