"""ToMe (vlmprune/methods/tome.py) against the official algorithm rebuilt by hand, its invariants,
its schedule and its refusals. The conformance kit (tests/test_conformance.py) runs keep-all (r=0),
batch, determinism and unwrap on every ViT flavour."""

from __future__ import annotations

import math

import pytest
import torch

import vlmprune
from vlmprune.methods.tome import parse_r, token_counts

from .cases import LLAVA

timm = pytest.importorskip("timm")


# -- the official algorithm, by hand ---------------------------------------------------------------
def official_merge(x, k_mean, size, r, prefix, class_token):
    """One ToMe merge over the whole sequence ``x [B, T, C]`` (prefix first), as
    facebookresearch/ToMe's ``bipartite_soft_matching`` + ``merge_wavg`` do it, every prefix token
    protected (the official code protects the class and distillation tokens: the same for a
    prefix of 1 or 2). Returns the merged sequence, prefix first, and the new sizes."""
    b, t, _ = x.shape
    r = min(r, (t - prefix) // 2)
    if r <= 0:
        return x, size
    m = k_mean / k_mean.norm(dim=-1, keepdim=True)
    a, bb = m[:, ::2], m[:, 1::2]
    scores = a @ bb.transpose(-1, -2)
    a_pos, b_pos = torch.arange(0, t, 2), torch.arange(1, t, 2)
    scores[:, a_pos < prefix, :] = -math.inf
    scores[:, :, b_pos < prefix] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge = node_max.argsort(dim=-1, descending=True, stable=True)
    unm, src = edge[:, r:], edge[:, :r]
    if class_token:
        unm = unm.sort(dim=1).values
    dst = node_idx.gather(1, src)
    size = torch.ones(b, t, 1) if size is None else size
    xs = x * size
    rows, sizes = [], []
    for i in range(b):
        av, bv = xs[i, ::2].clone(), xs[i, 1::2].clone()
        asz, bsz = size[i, ::2].clone(), size[i, 1::2].clone()
        for s, d in zip(src[i].tolist(), dst[i].tolist()):
            bv[d] += av[s]
            bsz[d] += asz[s]
        keep_a, keep_b = a_pos[unm[i]], b_pos
        order = [(int(p), av[j], asz[j]) for j, p in zip(unm[i].tolist(), keep_a)] + [
            (int(p), bv[j], bsz[j]) for j, p in enumerate(keep_b.tolist())
        ]
        head = sorted((o for o in order if o[0] < prefix), key=lambda o: o[0])
        body = [o for o in order if o[0] >= prefix]
        seq = head + body
        total = torch.stack([o[2] for o in seq])
        rows.append(torch.stack([o[1] for o in seq]) / total)
        sizes.append(total)
    return torch.stack(rows), torch.stack(sizes)


def timm_by_hand(model, pixels, schedule, prop_attn=True, prefix=None):
    """A timm ViT's forward with ToMe between attention and MLP of every block, written out;
    ``prefix``: the protected tokens (default: the model's whole prefix)."""
    prefix = model.num_prefix_tokens if prefix is None else prefix
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixels))))
        size = None
        for block, r in zip(model.blocks, schedule):
            attn = block.attn
            b, t, c = x.shape
            qkv = attn.qkv(block.norm1(x)).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            logits = (q @ k.transpose(-2, -1)) * attn.scale
            if prop_attn and size is not None:
                logits = logits + size.log()[:, None, None, :, 0]
            out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
            x = x + block.ls1(attn.proj(attn.norm(out)))
            x, size = official_merge(x, k.mean(1), size, r, prefix, model.cls_token is not None)
            x = x + block.ls2(block.mlp(block.norm2(x)))
        return model.forward_head(model.norm(x))


def tiny_timm(kind: str):
    """3-block timm ViTs on 32 x 32 images of 16 patches: CLS ("cls"), CLS + distillation token
    (DeiT, "distilled"), two registers and average pooling without a CLS token ("registers")."""
    torch.manual_seed(0)
    common = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5)
    if kind == "distilled":
        from timm.models.deit import VisionTransformerDistilled

        return VisionTransformerDistilled(**common).eval()
    if kind == "registers":
        return timm.models.vision_transformer.VisionTransformer(
            **common, class_token=False, reg_tokens=2, global_pool="avg", init_values=0.1).eval()
    return timm.models.vision_transformer.VisionTransformer(**common, init_values=0.1).eval()


@pytest.mark.parametrize("kind", ["cls", "distilled", "registers"])
@pytest.mark.parametrize("r,prop_attn", [(3, True), ((3, -1), True), ([5, 0, 2], True), (4, False)])
def test_tome_equals_the_official_algorithm_by_hand(kind, r, prop_attn):
    model = tiny_timm(kind)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = timm_by_hand(model, pixels, parse_r(3, r), prop_attn)
    with vlmprune.wrap(model, "tome", r=r, prop_attn=prop_attn) as handle, torch.no_grad():
        out = model(pixels)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    counts = token_counts(16, parse_r(3, r))
    assert [p["out"] for p in handle.stats["points"]] == [[n] * 3 for n, r_l in zip(counts[1:], parse_r(3, r)) if r_l]


def test_sizes_partition_the_patches_and_the_prefix_is_never_merged():
    """Composed over the points, the merge maps send each of the 16 patches to exactly one final
    token; the final tokens' sizes sum to 16; every kept index is a patch (the prefix is outside
    ``ctx.tokens``) and the prefix reaches the head unchanged by any merge."""
    model = tiny_timm("distilled")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with vlmprune.wrap(model, "tome", r=3) as handle, handle.record() as seen, torch.no_grad():
        model(pixels)
    owner = torch.arange(16).expand(2, -1)
    for record in seen:
        sel = record.selection
        assert sel.merge_map.shape == record.token_index.shape
        owner = sel.merge_map.gather(1, owner)
    final = seen[-1].selection.keep.shape[1]
    assert final == token_counts(16, parse_r(3, 3))[-1] == 7
    sizes = torch.zeros(2, final).scatter_add_(1, owner, torch.ones(2, 16))
    assert sizes.sum(-1).tolist() == [16.0, 16.0] and bool((sizes >= 1).all())


def test_registers_are_protected_where_the_official_code_would_merge_them():
    """The official code protects only class and distillation tokens; here every prefix token is
    (the docstring's one departure). On the registers-only model the two rules give different
    outputs, and the wrapped model follows the protected one."""
    model = tiny_timm("registers")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with vlmprune.wrap(model, "tome", r=[8]), torch.no_grad():
        out = model(pixels)
    protected = timm_by_hand(model, pixels, [8, 0, 0])
    official = timm_by_hand(model, pixels, [8, 0, 0], prefix=0)
    torch.testing.assert_close(out, protected, atol=1e-5, rtol=1e-5)
    assert (official - protected).abs().max() > 1e-3


def test_parse_r_follows_the_official_schedules():
    assert parse_r(12, 8) == [8] * 12
    assert parse_r(12, (8, -1)) == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]  # the paper's decreasing schedule
    assert parse_r(12, (8, 0)) == [8] * 12
    assert parse_r(4, [3, 1]) == [3, 1, 0, 0]
    assert token_counts(16, [8, 8, 8]) == [16, 8, 4, 2]


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"r": None}, ValueError, "option 'r' of method 'tome' is required"),
        ({"r": -1}, ValueError, "option 'r' of method 'tome' must be an int >= 0"),
        ({"r": (4, 2.0)}, ValueError, "inflection"),
        ({"r": [1, 1, 1, 1]}, ValueError, "at most 3 blocks"),
        ({"r": 2, "budget": 8}, TypeError, "parameter 'budget' does not apply to method 'tome'"),
    ],
)
def test_bad_options_are_refused_naming_the_parameter(options, error, match):
    model = tiny_timm("cls")
    with pytest.raises(error, match=match):
        vlmprune.wrap(model, "tome", **options)
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_tome_on_a_vlm_is_refused_naming_the_stage():
    with pytest.raises(ValueError, match="merges between attention and MLP inside each block"):
        vlmprune.wrap(LLAVA[0].model(), "tome", r=2)


def test_a_caller_attention_mask_with_proportional_attention_is_refused():
    model = tiny_timm("cls")
    with vlmprune.wrap(model, "tome", r=2), pytest.raises(NotImplementedError, match="attention mask of the caller"):
        model.forward_features(torch.randn(1, 3, 32, 32), attn_mask=torch.zeros(1, 1, 17, 17))
