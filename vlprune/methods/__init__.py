"""Built-in methods, one file each; importing this package registers them by name.

The package is also callable: ``vlprune.methods()`` returns ``{name: one-line summary}`` for every
registered method (the subpackage and the function share the name the public API promises).
"""
import sys
import types

from . import fastervlm, pool, random, uniform  # noqa: F401
from .base import Context, Method, Selection, Signal  # noqa: F401


class _CallableModule(types.ModuleType):
    def __call__(self) -> dict[str, str]:
        from ..api import methods

        return methods()


sys.modules[__name__].__class__ = _CallableModule
