"""The demo's diffusion view, without Gradio: the embedded text-to-image model
(``assets/embedded_diffusion``, :mod:`vlmprune.embedded.diffusion`) sampled from one prompt and
seed, unpruned and with its UNet wrapped by ToMeSD or OptiPrune's SimPrune, and what the view shows.

* :class:`DiffusionDemoModel` samples one prompt, unpruned or with a method, the sampling's
  selections recorded (:meth:`DiffusionDemoModel.run` -> :class:`Generation`);
  :func:`load_diffusion_demo` builds it offline.
* :func:`step_views`: the latent tokens kept / merged at one transformer block, per denoising step
  (the conditional half of the guidance batch). Each block call stands alone: the UNet adapter
  hands every token back at the block's exit, so a view is one record's selection.
* :func:`draw_tokens`: the generated image with the latent token grid over it, merged tokens
  dimmed; :func:`draw_groups`: each merge group in its own colour (as the Vim tab draws ToMe);
  :func:`result_text`: the tokens per block, the transformer blocks' FLOPs, the time and the
  difference to the unpruned image.

Methods (:data:`DIFFUSION_METHODS`) take :class:`DiffusionSetting`: their public options (ToMeSD's
``apply_patch`` defaults) and OptiPrune's LatentMapper, which optimises the initial noise first.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from PIL import Image

import vlmprune
from vlmprune.context import Point
from vlmprune.embedded import diffusion
from vlmprune.tools.eval_diffusion import CAPTIONS, mapped_noise

from .engine import DemoError, LazyModel, describe_error
from .view import TokenView, draw_overlay, legend_text, token_view
from .vit_view import _ms, draw_point

__all__ = ["DIFFUSION_METHODS", "PROMPTS", "DiffusionDemoModel", "DiffusionSetting", "Generation", "LazyDiffusion",
           "diffusion_wrap_options", "draw_groups", "draw_tokens", "enlarge", "highest_resolution_point", "load_diffusion_demo",
           "result_text", "step_caption", "step_views"]

DIFFUSION_METHODS = ("tomesd", "optiprune")
#: the benchmark's 24 captions (eval_diffusion's ``CAPTIONS``), "a red circle" first
PROMPTS = tuple(diffusion.caption(colour, shape) for colour, shape in CAPTIONS)
#: DDIM steps by default (the model's own default is 20); a run takes well under a second on CPU
DEFAULT_STEPS = 10
MAX_STEPS = 100


@dataclass
class DiffusionSetting:
    """The methods' public options (:class:`vlmprune.methods.tomesd.StrideMatching`; defaults:
    tomesd's ``apply_patch``): ``ratio`` of each block's tokens removed in the blocks at most
    ``max_downsample`` times smaller than the latent, one destination per ``sy x sx`` window
    (random with ``use_rand``), the ``merge_*`` branches run on the reduced tokens.
    ``latentmapper``: OptiPrune's LatentMapper optimises the initial noise on the wrapped UNet
    before sampling (as the benchmark's ``latentmapper + simprune`` row)."""

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    latentmapper: bool = False


def diffusion_wrap_options(method: str, setting: DiffusionSetting) -> dict:
    """The keyword arguments of :func:`vlmprune.wrap` for ``method`` at ``setting``."""
    if method not in DIFFUSION_METHODS:
        raise DemoError(f"method must be one of {', '.join(DIFFUSION_METHODS)} in the diffusion view; got {method!r}")
    options = asdict(setting)
    del options["latentmapper"]
    return options


@dataclass
class Generation:
    """One sampling: the ``image`` (the model's size), its ``seconds`` (LatentMapper's included),
    and for a method its options, ``stats`` (``handle.stats``) and the sampling's selection
    ``records``; or the ``error``."""

    prompt: str
    method: str | None
    options: dict = field(default_factory=dict)
    image: Image.Image | None = None
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    records: list = field(default_factory=list)
    latentmapper: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class DiffusionDemoModel:
    """A :class:`~vlmprune.embedded.diffusion.TextToImage` and a lock held from wrap to unwrap;
    :attr:`blocks`: each transformer block's tokens on the model's latent, in running order."""

    def __init__(self, model: diffusion.TextToImage, name: str = "diffusion", description: str | None = None):
        from vlmprune.adapters import find_adapter

        info = find_adapter(model.unet).info()
        self.model = model.eval()
        self.name = name
        self.description = description or name
        self.lock = threading.RLock()
        side = model.config.sample_size
        self.blocks = {str(Point(stage, layer)): math.ceil(side / info.downsample[stage]) ** 2
                       for stage, spec in info.stages.items() for layer in spec.layers}

    def summary(self) -> str:
        c = self.model.config
        blocks = ", ".join(f"{p} {n}" for p, n in self.blocks.items())
        return (f"{self.description}: {c.image_size} px images from a {c.sample_size}x{c.sample_size} latent; "
                f"tokens per transformer block: {blocks}")

    def run(self, prompt: str, seed: int = 0, steps: int = DEFAULT_STEPS, method: str | None = None,
            setting: DiffusionSetting | None = None, guidance: float | None = None) -> Generation:
        """Sample ``prompt`` from the noise of ``seed`` with ``steps`` DDIM steps, unpruned
        (``method=None``) or with ``method`` at ``setting``. Method and setting errors come back
        in ``.error``; a bad prompt, seed or step count raises :class:`DemoError`."""
        prompt, seed, steps = self._check(prompt, seed, steps)
        if method is None:
            with self.lock:
                image, seconds, _ = self._sample(prompt, seed, steps, guidance)
            return Generation(prompt, None, image=image, seconds=seconds)
        setting = setting or DiffusionSetting()
        try:
            options = diffusion_wrap_options(method, setting)
        except DemoError as exc:
            return Generation(prompt, method, error=str(exc))
        failed = Generation(prompt, method, options, latentmapper=setting.latentmapper)
        with self.lock:
            try:
                handle = vlmprune.wrap(self.model.unet, method, **options)
            except Exception as exc:  # noqa: BLE001 - a bad option, named by the method
                failed.error = describe_error(exc)
                return failed
            try:
                image, seconds, records = self._sample(prompt, seed, steps, guidance, handle, setting.latentmapper)
                stats = handle.stats
            except Exception as exc:  # noqa: BLE001 - reported in the page
                failed.error = describe_error(exc)
                return failed
            finally:
                handle.unwrap()
        return Generation(prompt, method, options, image, seconds, stats, records, setting.latentmapper)

    @staticmethod
    def _check(prompt, seed, steps) -> tuple[str, int, int]:
        prompt = " ".join(str(prompt or "").lower().split())
        try:
            diffusion.caption_ids([prompt])
            seed, steps = int(seed), int(steps)
        except (TypeError, ValueError) as exc:
            raise DemoError(str(exc)) from None
        if not 1 <= steps <= MAX_STEPS:
            raise DemoError(f"steps must be from 1 to {MAX_STEPS}, got {steps}")
        return prompt, seed, steps

    def _sample(self, prompt, seed, steps, guidance, handle=None, latentmapper=False):
        """``(image, seconds, records)``: the initial and the step noise drawn from one generator
        seeded ``seed`` (the same for every method); the records are the sampling's only."""
        generator = torch.Generator().manual_seed(seed)
        noise = self.model.noise(1, generator)
        start = time.perf_counter()
        if latentmapper:
            noise = mapped_noise(self.model, [prompt], noise, steps)
        with handle.record() if handle is not None else nullcontext([]) as records:
            x = self.model.sample([prompt], generator=generator, steps=steps, guidance=guidance, latents=noise)
        return diffusion.to_images(x)[0], time.perf_counter() - start, list(records)


# ----------------------------------------------------------------------------------- token views


def highest_resolution_point(records) -> str:
    """The first recorded point with the most tokens (``unet.down.0:0`` at ``max_downsample=1``)."""
    return str(max(records, key=lambda rec: rec.token_index.shape[1]).point)


def step_views(records, point: str) -> list[TokenView]:
    """The tokens kept / merged at ``point`` in each denoising step, in order (batch row 0: the
    conditional half)."""
    return [token_view([rec], rec.grid) for rec in records if str(rec.point) == point]


def enlarge(image: Image.Image, width: int) -> Image.Image:
    """A generated image scaled to ``width`` with its pixels kept sharp (nearest neighbour)."""
    return image.resize((width, round(width * image.height / image.width)), Image.NEAREST)


def draw_tokens(image: Image.Image, view: TokenView, width: int = 256) -> Image.Image:
    """``image`` with the latent token grid over it: the tokens ``view`` kept as they are, the
    merged ones (OptiPrune: pruned, given a copy) dimmed (:func:`~.view.draw_overlay`)."""
    kept_only = replace(view, owner=np.where(view.kept, view.owner, -1))
    return draw_overlay(enlarge(image, width), kept_only, width, outline=False)


def draw_groups(image: Image.Image, view: TokenView, width: int = 160) -> Image.Image:
    """``image`` with each merge group tinted in its own colour (:func:`~.vit_view.draw_point`)."""
    return draw_point(enlarge(image, width), view, width)


def step_caption(step: int, view: TokenView) -> str:
    return f"step {step + 1}: {view.n_kept} of {view.owner.size} kept"


# ----------------------------------------------------------------------------------- text


def _setting_text(result: Generation) -> str:
    o = result.options
    branches = [name for name, key in (("self-attention", "merge_attn"), ("cross-attention", "merge_crossattn"),
                                       ("MLP", "merge_mlp")) if o[key]]
    mapper = " · LatentMapper first" if result.latentmapper else ""
    return (f"**{result.method}** ratio {o['ratio']:g} in blocks ≤ {o['max_downsample']}× smaller than the latent, "
            f"{o['sy']}x{o['sx']} windows{' (random destination)' if o['use_rand'] else ''}, "
            f"reduced: {', '.join(branches)}{mapper}")


def result_text(result: Generation, model: DiffusionDemoModel, base: Generation | None = None) -> str:
    """Markdown for one sampling: the setting, the tokens per transformer block (conditional half,
    each step), the blocks' FLOPs, the time and the pixel difference to ``base``; or the error."""
    if not result.ok:
        return f"**⚠ error:** {result.error}"
    if result.method is None:
        return f"**unpruned** · all tokens in every transformer block · time {_ms(result.seconds)}"
    out = {p["point"]: p["out"][0] for p in result.stats.get("points", [])}
    blocks = " · ".join(f"{p} {n}→{out[p]}" if p in out else f"{p} {n}" for p, n in model.blocks.items())
    lines = [_setting_text(result), f"tokens per transformer block (each step): {blocks}"]
    if result.records:
        point = highest_resolution_point(result.records)
        lines.append(f"{point}, last step: {legend_text(step_views(result.records, point)[-1])}")
    stats = result.stats
    if stats.get("transformer_flops_unpruned"):
        lines.append(f"transformer-block FLOPs per step: "
                     f"{100 * stats['transformer_flops'] / stats['transformer_flops_unpruned']:.0f} % of unpruned")
    timing = f"time: {_ms(result.seconds)}"
    if base is not None and base.ok:
        timing += f" (unpruned {_ms(base.seconds)}, ×{base.seconds / max(result.seconds, 1e-9):.2f})"
        diff = np.abs(np.asarray(result.image, float) - np.asarray(base.image, float)).mean()
        timing += " · image vs unpruned: " + ("identical" if diff == 0 else f"mean |Δ| {diff:.1f} of 255")
    lines.append(timing)
    return "  \n".join(lines)


# ----------------------------------------------------------------------------------- loading


def load_diffusion_demo() -> DiffusionDemoModel:
    """The embedded text-to-image model (:func:`vlmprune.embedded.diffusion.load_diffusion`) after
    an untimed one-step warm-up; a :class:`DemoError` says what is missing."""
    try:
        model = diffusion.load_diffusion()
    except Exception as exc:  # noqa: BLE001 - diffusers missing, weights absent
        raise DemoError(f"Could not load the embedded text-to-image model ({describe_error(exc)}); it needs "
                        "diffusers (pip install 'vlmprune[diffusion]') and assets/embedded_diffusion.") from None
    model.sample([PROMPTS[0]], generator=torch.Generator().manual_seed(0), steps=1)
    return DiffusionDemoModel(model, name="embedded-diffusion",
                              description="embedded text-to-image UNet (pixel space, easy-VQA captions)")


class LazyDiffusion(LazyModel):
    """A :class:`DiffusionDemoModel`, or a loader called on first use."""

    kind = DiffusionDemoModel

    def __init__(self, source=load_diffusion_demo):
        super().__init__(source)
