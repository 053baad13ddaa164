"""Built-in methods, one file each; importing this package registers them by name.

Every module in this folder is imported, so adding a method is adding its file (and its test).
The package is also callable: ``vlprune.methods()`` returns ``{name: one-line summary}`` for every
registered method (the subpackage and the function share the name the public API promises).
Each registered method's class is exported here too, e.g. ``vlprune.methods.FasterVLM``, so that
``vlprune.patch(model, vlprune.methods.FasterVLM(layer=-3), keep=64)`` works.
"""
import importlib
import pkgutil
import sys
import types

from ..registry import _METHODS
from .base import Context, Method, Selection, Signal

__all__ = ["Context", "Method", "Selection", "Signal"]
for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        _module = importlib.import_module(f"{__name__}.{_info.name}")
        for _obj in list(vars(_module).values()):  # the registered method classes defined in that file
            registered = _METHODS.get(getattr(_obj, "name", None)) is _obj
            if isinstance(_obj, type) and _obj.__module__ == _module.__name__ and registered:
                globals()[_obj.__name__] = _obj
                __all__.append(_obj.__name__)


class _CallableModule(types.ModuleType):
    def __call__(self) -> dict[str, str]:
        from ..api import methods

        return methods()


sys.modules[__name__].__class__ = _CallableModule
