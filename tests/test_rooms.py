"""Rooms (issue 13): method files named for their registry keys, the core apart from ``eval``, and
the old module paths (before the moves) still importable with a warning naming the new one."""

import importlib
import json
import subprocess
import sys

import pytest

#: old module path -> where it lives now
MOVED = {
    "vlmprune.methods.random_prune": "vlmprune.methods.random",
    "vlmprune.methods.zeroth_order": "vlmprune.methods.zoo_prune",
    "vlmprune.adapters.llm": "vlmprune.adapters.decoder",
    "vlmprune.bench": "vlmprune.tools.bench",
    "vlmprune.calibrate_adatoken3d": "vlmprune.tools.calibrate_adatoken3d",
    "vlmprune.calibrate_vflowopt": "vlmprune.tools.calibrate_vflowopt",
    "vlmprune.train_atp": "vlmprune.tools.train_atp",
    "vlmprune.train_covipal": "vlmprune.tools.train_covipal",
    "vlmprune.embedded_training": "vlmprune.embedded.harness",
    "vlmprune.eval.train_embedded": "vlmprune.embedded.training",
}


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (the registry of this test session may hold test methods)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_each_method_class_lives_in_the_file_named_for_its_key():
    modules = json.loads(_python(
        "import json, vlmprune; "
        "print(json.dumps({m['name']: vlmprune.get_method(m['name']).__module__ for m in vlmprune.methods()}))"))
    assert {"random", "zoo_prune"} <= modules.keys()
    assert {name: module for name, module in modules.items() if module != f"vlmprune.methods.{name}"} == {}


def test_listing_methods_does_not_import_eval():
    assert _python("import sys, vlmprune; vlmprune.methods(); print('vlmprune.eval' in sys.modules)") == "False"


def test_importing_the_embedded_package_does_not_import_eval_or_its_tools():
    loaded = json.loads(_python(
        "import json, sys, vlmprune.embedded; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('vlmprune.eval', 'vlmprune.embedded')))))"))
    assert loaded == ["vlmprune.embedded", "vlmprune.embedded.model"]


def test_the_embedded_package_keeps_the_names_of_the_old_module():
    import vlmprune.embedded
    from vlmprune.embedded import model

    public = {name for name in vars(model) if name.isupper() and not name.startswith("_")} | set(model.__all__)
    assert public - set(vlmprune.embedded.__all__) == set()
    assert all(getattr(vlmprune.embedded, name) is getattr(model, name) for name in vlmprune.embedded.__all__)


@pytest.mark.parametrize("command,module", [("train-embedded", "training"), ("train-vit-heads", "vit_training")])
def test_training_commands_run_their_modules_in_the_embedded_room(command, module):
    done = subprocess.run([sys.executable, "-m", "vlmprune.cli", command, "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m vlmprune.embedded.{module} ")


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_warns_and_stands_for_the_new_module(old, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=f"^{old} moved to {MOVED[old]}; "):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert sys.modules[old] is module


@pytest.mark.parametrize("old", ["vlmprune.train_atp", "vlmprune.eval.train_embedded"])
def test_old_command_runs_the_new_one(old):
    done = subprocess.run([sys.executable, "-m", old, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {MOVED[old]} ")
    assert f"{old} moved to {MOVED[old]}" in done.stderr
