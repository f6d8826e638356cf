"""``handle.stats`` FLOPs and KV-cache bytes in absolute terms, against a count by hand from the
config and the tokens each decoder layer sees (issue #12: ratios cancel a wrong head count or a
linear attention term; absolute numbers do not).

The count (the cost model's documented convention): per decoder layer and token, multiply-adds
of the q, k, v, o projections (k and v with the *key-value* heads: grouped-query attention) and
the three MLP matrices; attention scores and mixing are causal, half of ``n * n`` pairs per query
head for each of the two products; FLOPs = 2 x multiply-adds. KV bytes = keys + values of the
key-value heads, per layer, for the tokens that layer keeps.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import vlmprune

from .tiny import batch, qwen_batch, tiny_llava, tiny_qwen

TEXT = [10, 11, 12, 13, 14]


def by_hand(cfg, lengths: list[int], bytes_per_value: int = 4) -> tuple[float, int]:
    """(prefill FLOPs, KV bytes) of one sequence whose decoder layer ``l`` sees ``lengths[l]`` tokens."""
    h, q_heads, kv_heads, inter = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    d = getattr(cfg, "head_dim", None) or h // q_heads
    flops, kv = 0.0, 0
    for n in lengths:
        q = h * q_heads * d
        k = v = h * kv_heads * d
        o = q_heads * d * h
        mlp = 3 * h * inter
        attention = 2 * q_heads * d * (n * n / 2)  # q.k^T and probs @ v, causal half
        flops += 2 * ((q + k + v + o + mlp) * n + attention)
        kv += 2 * kv_heads * d * bytes_per_value * n
    return flops, kv


def check(stats, cfg, full: list[int], pruned: list[list[int]]):
    want_full = [by_hand(cfg, [n] * cfg.num_hidden_layers) for n in full]
    want = [by_hand(cfg, lengths) for lengths in pruned]
    assert stats["llm_prefill_flops_unpruned"] == pytest.approx(sum(f for f, _ in want_full), rel=1e-12)
    assert stats["llm_prefill_flops"] == pytest.approx(sum(f for f, _ in want), rel=1e-12)
    assert stats["kv_cache_bytes_unpruned"] == sum(b for _, b in want_full)
    assert stats["kv_cache_bytes"] == sum(b for _, b in want)


@pytest.fixture(scope="module")
def llava():
    return tiny_llava("clip", "sdpa")


def test_fastv_llava_gqa_flops_and_kv_bytes_by_hand(llava):
    """FastV K=2 keeping 40 of 256: layers 0-1 see 262 tokens, layers 2-3 see 262 - 216 = 46;
    4 query heads, 2 key-value heads."""
    cfg = llava.config.text_config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    inputs = batch([TEXT])
    with vlmprune.wrap(llava, "fastv", budget=40, k_layer=2) as handle, torch.no_grad():
        llava(**inputs)
        stats = handle.stats
    check(stats, cfg, [262], [[262, 262, 46, 46]])


def test_projector_stage_batch_with_padding_by_hand(llava):
    """DivPrune at 57 of 256 on a batch of two prompts of different length (left padding): every
    row runs at the padded length (8 + 257 = 265), minus 199 pruned image tokens."""
    cfg = llava.config.text_config
    inputs = batch([TEXT, TEXT + [15, 16, 17]])
    length = inputs["input_ids"].shape[1]
    assert length == 265
    with vlmprune.wrap(llava, "divprune", budget=57) as handle, torch.no_grad():
        llava(**inputs)
        stats = handle.stats
    check(stats, cfg, [length, length], [[length - 199] * 4] * 2)


def test_head_dim_from_the_config_not_hidden_over_heads():
    """A decoder whose head_dim (24) is not hidden / heads (16): projections and the KV cache use 24."""
    base = tiny_llava("clip", "sdpa")
    config = base.config
    config.text_config.head_dim = 24
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    assert model.model.language_model.layers[0].self_attn.k_proj.out_features == 2 * 24
    inputs = batch([TEXT])
    with vlmprune.wrap(model, "fastv", budget=40, k_layer=2) as handle, torch.no_grad():
        model(**inputs)
        stats = handle.stats
    check(stats, config.text_config, [262], [[262, 262, 46, 46]])


def test_qwen2_vl_fastv_by_hand():
    """Tiny Qwen2-VL (4 query / 2 key-value heads), an 8 x 8 patch grid = 16 visual tokens,
    FastV K=2 keeping 5: 2 + 16 + 1 + 5 = 24 tokens, then 24 - 11 = 13."""
    model = tiny_qwen("2")
    cfg = model.config.text_config
    inputs = qwen_batch([TEXT], [(8, 8)])
    assert inputs["input_ids"].shape[1] == 24
    with vlmprune.wrap(model, "fastv", budget=5, k_layer=2) as handle, torch.no_grad():
        model(**inputs)
        stats = handle.stats
    check(stats, cfg, [24], [[24, 24, 13, 13]])


def test_progressive_points_by_hand(llava):
    """AdaToken-3D before layers 1 and 3, keeping 78 then 26 of 256 (ratios 0.3 / 0.1, budget
    0.1): layer 0 sees 262 tokens, layers 1-2 see 262 - 178 = 84, layer 3 sees 262 - 230 = 32."""
    inputs = batch([TEXT])
    with vlmprune.wrap(llava, "adatoken3d", budget=0.1, layers=(1, 3), layers_of=0, ratios=(0.3, 0.1)) as handle:
        with torch.no_grad():
            llava(**inputs)
        stats = handle.stats
    check(stats, llava.config.text_config, [262], [[262, 84, 84, 32]])


def test_kv_bytes_follow_the_model_dtype():
    """A bfloat16 model stores 2 bytes per cached value, not 4."""
    model = tiny_llava("clip", "sdpa").to(torch.bfloat16)
    inputs = batch([TEXT])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with vlmprune.wrap(model, "fastv", budget=40, k_layer=2) as handle, torch.no_grad():
        model(**inputs)
        stats = handle.stats
    lengths = [262, 262, 46, 46]
    assert stats["kv_cache_bytes"] == by_hand(model.config.text_config, lengths, bytes_per_value=2)[1]
