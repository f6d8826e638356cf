""".ci/run with stand-in commands on PATH: it stops when Chromium cannot be installed (the
browser test used to skip quietly after a failed apt-get), and its last command is the README's
test command, word for word."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "run"


def readme_test_command() -> str:
    """The test command of the README's Quick start (the last line of its first bash block)."""
    text = (ROOT / "README.md").read_text()
    quick = text[text.index("## Quick start"):]
    block = re.search(r"```bash\n(.*?)```", quick, re.S).group(1)
    return block.strip().splitlines()[-1].strip()


def run_ci(tmp_path: Path, apt_get_status: int, chromium: bool):
    """Run a copy of .ci/run with PATH holding only stand-ins: ``apt-get`` (exits with
    ``apt_get_status``, logs its arguments), ``python3`` (logs its arguments), ``chromium`` if
    asked. Returns (exit status, stderr, apt-get calls, python3 calls)."""
    repo, bin_ = tmp_path / "repo", tmp_path / "bin"
    (repo / ".ci").mkdir(parents=True)
    bin_.mkdir()
    shutil.copy(SCRIPT, repo / ".ci" / "run")
    (bin_ / "dirname").symlink_to(shutil.which("dirname"))
    logs = {name: tmp_path / f"{name}.log" for name in ("apt-get", "python3")}
    stubs = {"apt-get": f'echo "$@" >> {logs["apt-get"]}\nexit {apt_get_status}',
             "python3": f'echo "$@" >> {logs["python3"]}'}
    if chromium:
        stubs["chromium"] = "exit 0"
    for name, body in stubs.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    proc = subprocess.run(["/bin/bash", str(repo / ".ci" / "run")], env={"PATH": str(bin_)},
                          capture_output=True, text=True, timeout=60)

    def lines(name):
        return logs[name].read_text().splitlines() if logs[name].exists() else []

    return proc.returncode, proc.stderr, lines("apt-get"), lines("python3")


@pytest.mark.parametrize("apt_get_status", [100, 0])
def test_ci_run_stops_when_chromium_cannot_be_installed(tmp_path, apt_get_status):
    """apt-get failing, or succeeding without a chromium afterwards: the script exits non-zero
    before installing or testing anything."""
    status, stderr, apt_get, python3 = run_ci(tmp_path, apt_get_status, chromium=False)
    assert status != 0 and python3 == []
    assert apt_get[0] == "update -qq"
    if apt_get_status == 0:
        assert apt_get[1] == "install -y -qq chromium" and "chromium is not installed" in stderr


def test_ci_run_ends_with_the_readme_test_command(tmp_path):
    status, _, apt_get, python3 = run_ci(tmp_path, 0, chromium=True)
    command = readme_test_command()
    assert status == 0 and apt_get == []
    assert command == "python3 -m pytest -q -rs"  # -rs: every skip with its reason
    assert python3[-1] == command.removeprefix("python3 ") and python3[0].startswith("-m pip install")
    assert SCRIPT.read_text().rstrip().splitlines()[-1] == command
