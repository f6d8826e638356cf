"""Recoverable Compression (card: shared/methods/recovery.md section 1): the LOF filter against
scikit-learn, the card's steps on planted tensors against a by-hand loop of the official code,
the code's quirks (``code_exact``), the CLS-free saliency, and the Qwen-VL path rebuilt by hand."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import vlmprune
from tests.cases import QWEN_IMAGE, QwenCase
from tests.contexts import make_context
from tests.truth import record_selections
from vlmprune.context import ModelInfo
from vlmprune.primitives.lof import local_outlier_factor, lof_outlier_count

INFO = ModelInfo("test", 64, (8, 8), True, 4, 2, 4, ("encoder", "projector", "llm"))
NO_CLS = ModelInfo("test", 16, (4, 4), False, 4, 3, 4, ("encoder", "projector", "llm"), patches_per_token=4)
N, C, HEADS, D_HEAD, D_LLM = 64, 64, 2, 8, 32
SPIKE = 1.0  # token 37 draws the CLS query without taking all its attention (the weights a_j stay alive)


def _lof_data():
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(200, generator=gen, dtype=torch.float64) ** 3
    tied = spread.clone()
    tied[:40] = tied.min()  # RC's text filter sets the visual picks to min(s): a cluster of ties
    return {"spread": spread, "tied": tied, "few": spread[:12]}


@pytest.mark.parametrize("data", ["spread", "tied", "few"])
@pytest.mark.parametrize("k", [10, 20])
def test_lof_matches_sklearn(data, k):
    """Our LOF equals scikit-learn's ``-negative_outlier_factor_`` (float64 input) and the
    outliers of ``fit_predict`` with contamination "auto", also on float32 input (the code's);
    ``few``: fewer entries than neighbours."""
    neighbors = pytest.importorskip("sklearn.neighbors", reason="scikit-learn not installed: the reference LOF is its")
    x = _lof_data()[data]
    with warnings.catch_warnings():  # scikit-learn warns on ties and on fewer samples than neighbours
        warnings.simplefilter("ignore")
        ref = neighbors.LocalOutlierFactor(n_neighbors=k).fit(x.numpy()[:, None])
        flags = neighbors.LocalOutlierFactor(n_neighbors=k).fit_predict(x.float().numpy()[:, None])
    torch.testing.assert_close(local_outlier_factor(x, k), torch.from_numpy(-ref.negative_outlier_factor_), rtol=1e-9, atol=0)
    assert lof_outlier_count(x.float(), k) == int((flags == -1).sum())
    assert (flags == -1).any() or data == "few"


def test_lof_plants_and_bad_input():
    x = torch.linspace(0, 1, 50)
    x[7] = 40.0
    assert lof_outlier_count(x, 20) == 1 and local_outlier_factor(x, 20).argmax() == 7
    assert lof_outlier_count(torch.ones(1), 20) == 0
    with pytest.raises(ValueError, match="n_neighbors"):
        local_outlier_factor(x, 0)


# -- the card's steps on planted tensors ---------------------------------------------------------------
def planted(seed=3, batch=1):
    """Tokens ``[B, N, C]``, CLS-first q/k/v ``[B, H, 1+N, d]`` where token 37 draws the CLS
    query, projected tokens whose token 20 equals the mean text embedding (token 37 also matches
    the text: its text score is masked once it is a visual pick)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, N, C, generator=gen)
    q = torch.randn(batch, HEADS, 1 + N, D_HEAD, generator=gen)
    k = torch.randn(batch, HEADS, 1 + N, D_HEAD, generator=gen)
    k[:, :, 1 + 37] = q[:, :, 0] * SPIKE
    text = torch.randn(batch, 5, D_LLM, generator=gen)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[:, -1] = False
    text[:, -1] = 100.0  # padding: outside the mask, must not count
    projected = torch.randn(batch, N, D_LLM, generator=gen)
    projected[:, 20] = text[:, :4].mean(1) * 2.0
    projected[:, 37] = text[:, :4].mean(1)
    return x, (q, k, torch.randn_like(k)), projected, (text, mask)


def rc_context(x, qkv, projected, text, budget=N, info=INFO):
    signals = {"encoder_qkv": lambda **kw: qkv, "projected": lambda **kw: projected, "text_embedding": lambda **kw: text}
    return make_context(x, budget, signals, info)


def official(x, q, k, projected, text, mask, code_exact, k_vis=20, k_rest=10, topk=32, weight=50.0):
    """One image, the official ``token_recycling_with_text_in_vision_and_clustring`` step by step
    (its per-centre loop), with the text vector = the masked mean of ``text``; ``code_exact``
    picks the code's N_ref / key indices / lone-summary drop, else the paper's intent."""
    qf = q.transpose(0, 1).reshape(1 + N, -1)
    kf = k.transpose(0, 1).reshape(1 + N, -1)
    a = torch.softmax(qf[0] @ kf.T / kf.shape[-1] ** 0.5, -1)[1:]
    t = text[mask].mean(0)
    s = F.normalize(projected, dim=-1) @ F.normalize(t, dim=0) / projected.shape[-1] ** 0.5
    by_vision = a.topk(int(N * lof_outlier_count(a, k_vis) / N)).indices
    s[by_vision] = s.min()
    by_text = s.topk(int((N - len(by_vision)) * lof_outlier_count(s, k_vis) / N)).indices
    main = torch.cat([by_vision, by_text]).sort().values
    rest = [i for i in range(N) if i not in main.tolist()]
    a_r, s_r = a[rest], weight * s[rest]
    n_ref = C if code_exact else len(rest)
    centres = a_r.topk(min(int(n_ref * lof_outlier_count(a_r, k_rest) / len(rest)), len(rest))).indices.tolist()
    non_centres = [j for j in range(len(rest)) if j not in centres]
    key_of = (lambda j: kf[1 + j]) if code_exact else (lambda j: kf[1 + rest[j]])
    updated = []
    for i, c in enumerate(centres):
        others = centres[:i] + centres[i + 1 :] + non_centres  # the code's order: other centres, then the rest
        sim = torch.stack([F.cosine_similarity(key_of(c), key_of(j), dim=0) + s_r[j] for j in others])
        chosen = [others[j] for j in sim.topk(min(topk, len(others))).indices.tolist()]
        updated.append(x[rest[c]] + sum(a_r[j] * x[rest[j]] for j in chosen))
    extra = sum(a_r[j] * x[rest[j]] for j in non_centres)[None]
    if code_exact and not centres:
        extra = extra[:0]
    keep = torch.cat([main, torch.tensor([rest[c] for c in centres], dtype=torch.long)])
    values = torch.cat([x[main]] + ([torch.stack(updated)] if updated else []))
    return keep, values, extra, main, by_vision, by_text


@pytest.mark.parametrize("code_exact", [False, True])
def test_steps_equal_the_official_loop_by_hand(code_exact):
    """Main tokens, updated centres (``x_i + sum a_j x_j`` over the top-k of cos(keys) + 50 s)
    and the summary token equal the by-hand loop; token 37 (planted CLS-attention outlier) is a
    visual pick, token 20 (projected = text) a text pick; main tokens are unchanged, in order."""
    x, qkv, projected, (text, mask) = planted()
    method = vlmprune.get_method("recoverable_compression")(code_exact=code_exact, merge_topk=8)  # 32 takes most of |R| = 39
    sel = method.select(rc_context(x, qkv, projected, (text, mask)))
    keep, values, extra, main, by_vision, by_text = official(x[0], qkv[0][0], qkv[1][0], projected[0].clone(), text[0], mask[0],
                                                             code_exact, topk=8)
    assert 37 in by_vision.tolist() and 20 in by_text.tolist() and 37 not in by_text.tolist()
    n_centres = keep.numel() - main.numel()
    assert n_centres >= 2 and main.numel() >= 3  # every step has work to do
    assert torch.equal(sel.keep[0], keep)
    torch.testing.assert_close(sel.merged[0], values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sel.extra[0], extra, atol=1e-5, rtol=1e-5)
    assert torch.equal(sel.merged[0][: main.numel()], x[0, main])
    assert sel.merge_map[0, keep].tolist() == list(range(keep.numel()))


def test_code_exact_differs_where_the_card_says():
    """With R-local key indices and N_ref = C (64 > |R|) the code gets other centres than the
    paper's reading; the main tokens are the same."""
    x, qkv, projected, text = planted()
    method = vlmprune.get_method("recoverable_compression")
    paper = method().select(rc_context(x, qkv, projected, text))
    code = method(code_exact=True).select(rc_context(x, qkv, projected, text))
    _, _, _, main, _, _ = official(x[0], qkv[0][0], qkv[1][0], projected[0].clone(), text[0][0], text[1][0], False)
    assert torch.equal(paper.keep[0][: main.numel()], code.keep[0][: main.numel()])
    assert not torch.equal(paper.keep[0], code.keep[0]) or not torch.allclose(paper.merged[0], code.merged[0])


def test_budget_caps_and_the_lone_summary():
    """A budget one above the main tokens leaves no centre: the summary of every rest token
    stays (paper) or is dropped (code); a budget below the main count keeps the visual picks
    first and always one slot for the summary."""
    x, qkv, projected, text = planted()
    method = vlmprune.get_method("recoverable_compression")
    _, _, _, main, by_vision, _ = official(x[0], qkv[0][0], qkv[1][0], projected[0].clone(), text[0][0], text[1][0], False)
    a = method().saliency_and_keys(rc_context(x, qkv, projected, text))[0][0]
    for code_exact, summaries in ((False, 1), (True, 0)):
        sel = method(code_exact=code_exact).select(rc_context(x, qkv, projected, text, budget=main.numel() + 1))
        assert torch.equal(sel.keep[0], main) and sel.extra[0].shape[0] == summaries
        rest = torch.ones(N, dtype=torch.bool)
        rest[main] = False
        if summaries:
            torch.testing.assert_close(sel.extra[0][0], (a[rest, None] * x[0, rest]).sum(0), atol=1e-5, rtol=1e-5)
    sel = method().select(rc_context(x, qkv, projected, text, budget=3))
    assert torch.equal(sel.keep[0], by_vision[:2].sort().values) and sel.extra[0].shape[0] == 1
    sel = method(code_exact=True).select(rc_context(x, qkv, projected, text, budget=1))
    assert sel.keep[0].numel() == 0 and sel.extra[0].shape[0] == 1  # never no token at all


def test_batch_rows_are_ragged_and_equal_single_images():
    x, (q, k, v), projected, (text, mask) = planted(seed=1, batch=2)
    x[1], q[1], k[1], projected[1] = x[1].roll(5, 0), q[1] * 0.5, k[1].roll(9, 1), projected[1].flip(0)
    method = vlmprune.get_method("recoverable_compression")()
    both = method.select(rc_context(x, (q, k, v), projected, (text, mask)))
    counts = [kk.numel() for kk in both.keep]
    assert counts[0] != counts[1]
    for i in range(2):
        one = method.select(rc_context(x[i : i + 1], (q[i : i + 1], k[i : i + 1], v[i : i + 1]), projected[i : i + 1],
                                       (text[i : i + 1], mask[i : i + 1])))
        assert torch.equal(one.keep[0], both.keep[i])
        torch.testing.assert_close(one.merged[0], both.merged[i])
        torch.testing.assert_close(one.extra[0], both.extra[i])


def test_cls_free_saliency_is_the_mean_query_summed_over_each_tokens_patches():
    """Without a CLS token (Qwen: 4 patches per token) ``a`` = softmax of the mean patch query
    against every patch (one full-width head), summed per token; keys: the patches' mean."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, HEADS, 64, D_HEAD, generator=gen), torch.randn(1, HEADS, 64, D_HEAD, generator=gen)
    x = torch.randn(1, 16, C, generator=gen)
    ctx = rc_context(x, (q, k, k), torch.randn(1, 16, D_LLM), (torch.randn(1, 2, D_LLM), torch.ones(1, 2, dtype=torch.bool)),
                     budget=16, info=NO_CLS)
    a, keys = vlmprune.get_method("recoverable_compression")().saliency_and_keys(ctx)
    qf, kf = q[0].transpose(0, 1).reshape(64, -1), k[0].transpose(0, 1).reshape(64, -1)
    per_patch = torch.softmax(qf.mean(0) @ kf.T / 16**0.5, -1)
    torch.testing.assert_close(a[0], per_patch.view(16, 4).sum(1))
    torch.testing.assert_close(keys[0], kf.view(16, 4, -1).mean(1))
    with pytest.raises(ValueError, match="needs a CLS token"):
        vlmprune.get_method("recoverable_compression")(saliency="cls").check(NO_CLS)


def test_bad_options_name_the_parameter():
    with pytest.raises(ValueError, match="saliency"):
        vlmprune.get_method("recoverable_compression")(saliency="relay")
    with pytest.raises(ValueError, match="merge_topk"):
        vlmprune.get_method("recoverable_compression")(merge_topk=0)


def test_qwen_by_hand():
    """Qwen2-VL, two images of 64 and 48 tokens: the logits equal the unwrapped LLM's on a prompt
    whose image span holds the method's values (main, centres, in its order) at their own 3-D
    positions, then the summary token at the image's first position."""
    case = QwenCase("2")
    model, inputs = case.model(), case.inputs(2, seed=1)
    with vlmprune.wrap(model, "recoverable_compression", budget=24) as handle, record_selections(handle) as seen:
        pruned = case.forward(model, inputs)
    seen = list(seen)
    pos, emb = case._unpruned(model, inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rows = []
    for i in range(ids.shape[0]):
        rec = next(r for r in seen if i in r.images)
        keep, merged, extra = rec[2].per_image()[rec.images.index(i)]
        assert extra.shape[0] == 1 and merged.shape[0] == keep.numel() <= 23
        img = (ids[i] == QWEN_IMAGE).nonzero().flatten()
        real = mask[i].bool().nonzero().flatten()
        before, after = real[real < img[0]], real[real > img[-1]]
        values = torch.cat([emb[i, before], merged, extra, emb[i, after]])
        where = torch.cat([before, img[keep], img[:1], after])
        rows.append((values, pos[:, i, where]))
    longest = max(v.shape[0] for v, _ in rows)
    embeds = torch.zeros(len(rows), longest, emb.shape[-1])
    new_mask = torch.zeros(len(rows), longest, dtype=torch.long)
    new_pos = torch.zeros(3, len(rows), longest, dtype=torch.long)
    for i, (values, p) in enumerate(rows):
        embeds[i, longest - values.shape[0] :], new_mask[i, longest - values.shape[0] :] = values, 1
        new_pos[:, i, longest - values.shape[0] :] = p
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=new_mask, position_ids=new_pos).logits
    for i, (values, _) in enumerate(rows):
        torch.testing.assert_close(pruned[i, -values.shape[0] :], ref[i, -values.shape[0] :], atol=1e-5, rtol=1e-5)
