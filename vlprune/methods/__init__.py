"""Built-in methods, one file each; importing this package registers them by name.

Every module in this folder is imported, so adding a method is adding its file (and its test).
The package is also callable: ``vlprune.methods()`` returns ``{name: one-line summary}`` for every
registered method (the subpackage and the function share the name the public API promises).
"""
import importlib
import pkgutil
import sys
import types

from .base import Context, Method, Selection, Signal  # noqa: F401

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


class _CallableModule(types.ModuleType):
    def __call__(self) -> dict[str, str]:
        from ..api import methods

        return methods()


sys.modules[__name__].__class__ = _CallableModule
