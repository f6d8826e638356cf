"""vlmprune: training-free visual-token pruning for vision models (VLMs first, plain ViTs next).

``vlmprune.wrap(model, method="visionzip", budget=64)`` patches a transformers VLM in place;
``vlmprune.methods()`` lists what is registered.
"""

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .budget import Budget
from .context import ModelInfo, Point, Selection, SelectionRecord, Session, Signals, StageSpec, State, TokenContext, VLMInfo
from .method import Method, option
from .reduction import Reduction
from .registry import get_method, methods, register
from .wrap import Handle, wrap

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "Handle",
    "Method",
    "ModelInfo",
    "Point",
    "Reduction",
    "Selection",
    "SelectionRecord",
    "Session",
    "Signals",
    "StageSpec",
    "State",
    "TokenContext",
    "VLMInfo",
    "get_method",
    "methods",
    "option",
    "register",
    "wrap",
]
