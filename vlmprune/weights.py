"""Weights files of the trained modules some methods use (ATP's threshold heads, CoViPAL's PPM):
one safetensors file holding the module's state, with metadata ``format`` (a tag naming the
kind of module), ``method``, ``config`` (the constructor's arguments, JSON) and optionally
``training`` (JSON, what the training command records)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from torch import nn


def save_module(module: nn.Module, path, *, fmt: str, method: str, config: dict, training: dict | None = None) -> None:
    """Write ``module``'s state and metadata to the safetensors file ``path``."""
    from safetensors.torch import save_file

    meta = {"format": fmt, "method": method, "config": json.dumps(config)}
    if training:
        meta["training"] = json.dumps(training)
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path), metadata=meta)


def load_module(path, build: Callable[[dict], nn.Module], *, fmt: str, method: str, kind: str, train: str) -> nn.Module:
    """The module ``build(config)`` with the state of the file ``path`` (written by
    :func:`save_module` with format ``fmt``), in eval mode, its ``training`` metadata as
    ``training_info``. Every failure is a ValueError naming parameter 'weights' of ``method``,
    the path and the ``kind`` of file expected (with its article: ``"an ATP threshold-head"``;
    ``train``: the command that writes one)."""
    from safetensors import SafetensorError, safe_open

    where = f"parameter 'weights' of method {method!r} ({str(path)!r})"
    if not Path(path).is_file():
        raise ValueError(f"{where}: no such file (train one with {train})")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except SafetensorError as exc:
        raise ValueError(f"{where}: not a safetensors file ({exc}); expected {kind} file written by {train}") from exc
    if meta.get("format") != fmt:
        raise ValueError(f"{where}: not {kind} file (metadata format {meta.get('format')!r}, expected {fmt!r})")
    try:
        config = json.loads(meta["config"])
        training = json.loads(meta.get("training", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: the file's metadata lacks a valid 'config' entry (JSON); rewrite it with {train}") from exc
    module = build_module(build, config, state, where)
    module.training_info = training
    return module


def build_module(build: Callable[[dict], nn.Module], config: dict, state: dict, where: str) -> nn.Module:
    """``build(config)`` loaded with ``state`` (strict) in eval mode; a mismatch is a ValueError
    starting with ``where``."""
    try:
        module = build(config)
        module.load_state_dict(state, strict=True)
    except (TypeError, KeyError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{where}: the config and state do not build the module ({exc})") from exc
    return module.eval()
