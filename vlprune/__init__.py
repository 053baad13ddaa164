"""vlprune: training-free visual-token pruning for vision-language models, as a reversible patch."""
from . import builtin_methods as _builtin_methods  # noqa: F401  (registers the built-in methods)
from .api import Handle, PatchConfig, methods, patch, pruned, unpatch
from .embedded import load_embedded  # noqa: F401  (the offline default model: (model, processor))
from .errors import VlpruneError
from .builtin_methods.base import Context, Method, Selection, Signal
from .patcher import ImageRecord, Patcher
from .registry import register_method, register_patcher, supported_model_classes

__version__ = "0.1.0"
__all__ = [
    "patch", "pruned", "unpatch", "methods", "Handle", "PatchConfig", "ImageRecord", "VlpruneError",
    "Method", "Selection", "Signal", "Context", "Patcher", "register_method", "register_patcher",
    "supported_model_classes",
]
