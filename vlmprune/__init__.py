"""vlmprune: training-free visual-token pruning for vision-language models.

``vlmprune.wrap(model, method="visionzip", budget=64)`` patches a transformers VLM in place;
``vlmprune.methods()`` lists what is registered.
"""

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .budget import Budget
from .context import ModelInfo, Point, Selection, SelectionRecord, Signals, StageSpec, TokenContext, VLMInfo
from .method import Method, option
from .registry import get_method, methods, register
from .wrap import Handle, wrap

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "Handle",
    "Method",
    "ModelInfo",
    "Point",
    "Selection",
    "SelectionRecord",
    "Signals",
    "StageSpec",
    "TokenContext",
    "VLMInfo",
    "get_method",
    "methods",
    "option",
    "register",
    "wrap",
]
