"""Model-family patchers (installed as ``vlprune.patches``); importing registers them by class name.

Each patcher module imports its model library lazily, so an optional dependency is needed only when
a model of that family is patched.
"""
from . import llava_hf  # noqa: F401
