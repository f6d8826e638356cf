"""The lmms-eval plugin end to end under lmms-eval's own CLI (our entry point, a local task through
``--include_path``, offline), in one process and across two: ``accelerate launch --num_processes 2
-m lmms_eval --model vlmprune_llava`` on the CPU (gloo) answers every question as one process does
and reports the same scores.

The one-process run is made once and shared (each lmms-eval start-up costs ~12 s); the two-process
run adds ~25 s, hence ``slow`` (``-m "not slow"`` leaves it out). lmms-eval exits 0 even when the
run crashed inside, so the results and samples files are what is checked. The model is the embedded
one, or ``VLMPRUNE_EVAL_TEST_MODEL=<dir>`` (see ``test_eval.py``).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from vlmprune.eval import tasks as T

from tests.test_eval import HAVE_EASY_VQA, KEEP_0111, OFFLINE, _model_under_test

HAVE_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
needs_lmms_eval = pytest.mark.skipif(not HAVE_LMMS_EVAL, reason="lmms-eval not installed (pip install 'vlmprune[eval]')")
LIMIT = 5  # odd: the second rank gets one question fewer, so lmms-eval pads its share


def _run(cmd, out: Path, env: dict) -> tuple[dict, dict, str]:
    """Run one lmms-eval command; return (results json, samples by doc_id, log)."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    files = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    assert len(files) == 1, f"no results file (the run crashed?):\n{log[-6000:]}"
    samples = [json.loads(line) for f in glob.glob(str(out / "**" / "*_samples_easyvqa.jsonl"), recursive=True)
               for line in Path(f).read_text().splitlines()]
    by_doc = {s["doc_id"]: s for s in samples}
    assert len(by_doc) == len(samples), "a question was answered twice (rank padding leaked into the samples)"
    return json.loads(Path(files[0]).read_text()), by_doc, log


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """``(lmms-eval arguments, environment, results, samples by doc_id, whether the model is the
    embedded one)`` of one single-process run on ``LIMIT`` easyvqa questions."""
    if not HAVE_LMMS_EVAL:
        pytest.skip("lmms-eval not installed (pip install 'vlmprune[eval]')")
    if not HAVE_EASY_VQA:
        pytest.skip("easy-vqa not installed (pip install 'vlmprune[eval]')")
    model, embedded = _model_under_test()
    tmp = tmp_path_factory.mktemp("lmms")
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp / "hf"), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    model_args = "method=visionzip,budget=0.111" + (f",pretrained={model}" if model else "")
    lmms = ["-m", "lmms_eval", "--model", "vlmprune_llava", "--model_args", model_args,
            "--tasks", "easyvqa", "--include_path", str(T.task_dir()), "--batch_size", "2",
            "--limit", str(LIMIT), "--log_samples", "--verbosity", "INFO"]
    results, samples, _ = _run([sys.executable, *lmms, "--output_path", str(tmp / "one")], tmp / "one", env)
    return lmms, env, results, samples, embedded


def test_lmms_eval_plugin_end_to_end(one_process):
    """Every question answered once, with the asked number of visual tokens, and scored."""
    _, _, results, samples, embedded = one_process
    r = results["results"]["easyvqa"]
    assert 0.0 <= r["exact_match,none"] <= 1.0
    assert r["visual_tokens,none"] == KEEP_0111
    assert results["n-samples"]["easyvqa"]["effective"] == LIMIT
    assert sorted(samples) == list(range(LIMIT))
    assert all(s["visual_tokens"] == KEEP_0111 for s in samples.values())
    if embedded:  # the embedded model answers with one vocabulary word
        from vlmprune.eval.easyvqa import ANSWERS

        assert all(T.normalize_answer(s["filtered_resps"]) in ANSWERS for s in samples.values()), samples


@pytest.mark.slow
def test_two_processes_answer_as_one(one_process, tmp_path):
    lmms, env, one, one_samples, _ = one_process
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--num_cpu_threads_per_process", "1", "--main_process_port", "29517"]
    two, two_samples, log = _run([*launch, *lmms, "--output_path", str(tmp_path / "two")], tmp_path / "two",
                                 {**env, "ACCELERATE_USE_CPU": "1"})

    # both ranks answered their share (3 + 2, the second padded to 3 by lmms-eval), on the CPU
    shares = re.findall(r"mean over (\d+) requests on rank (\d) of 2", log)
    assert sorted(shares) == [("3", "0"), ("3", "1")], log[-6000:]
    assert {"rank 0 of 2", "rank 1 of 2"} <= set(re.findall(r"on cpu \((rank \d of 2)", log)), log[-6000:]

    assert sorted(one_samples) == sorted(two_samples) == list(range(LIMIT))
    for doc_id, s in one_samples.items():
        t = two_samples[doc_id]
        assert (t["filtered_resps"], t["exact_match"], t["visual_tokens"]) == \
               (s["filtered_resps"], s["exact_match"], s["visual_tokens"]), (doc_id, s, t)
    assert two["results"]["easyvqa"] == one["results"]["easyvqa"]
    assert two["n-samples"]["easyvqa"]["effective"] == one["n-samples"]["easyvqa"]["effective"] == LIMIT


@needs_lmms_eval
def test_world_size_without_process_group_is_refused(monkeypatch):
    """``accelerate launch --num_processes 2`` on a machine without GPUs starts one process unless
    told the CPU is the device; a WORLD_SIZE that accelerate did not honour is refused with the
    command that works, before the model loads."""
    from accelerate.state import AcceleratorState
    from vlmprune.eval import lmms_plugin

    monkeypatch.setattr(lmms_plugin, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    AcceleratorState._reset_state(True)
    try:
        with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 but accelerate set up 1 process\(es\); without GPUs, "
                                               r"launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu"):
            lmms_plugin.VlmpruneLlava(method="visionzip", budget=0.111)
    finally:
        AcceleratorState._reset_state(True)
