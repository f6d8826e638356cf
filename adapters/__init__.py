"""Model adapters: each knows one family's anatomy and owns every mechanical detail of
removing tokens (installed as ``vlmprune.adapters``)."""

from .base import ADAPTERS, Adapter, Plan, find_adapter, register_adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .mamba import VimAdapter
from .pi0 import PI0Adapter
from .qwen import QwenVLAdapter
from .retrieval import RetrievalAdapter
from .unet import UNetAdapter
from .vit import ViTAdapter
from .vla import VLAAdapter

__all__ = ["ADAPTERS", "Adapter", "Plan", "LlavaAdapter", "LlavaNextAdapter", "PI0Adapter", "QwenVLAdapter", "RetrievalAdapter", "UNetAdapter", "ViTAdapter", "VimAdapter", "VLAAdapter", "find_adapter", "register_adapter"]
