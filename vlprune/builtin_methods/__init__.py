"""Built-in methods, one file each; importing this package registers them by name.

Every module in this folder is imported, so adding a method is adding its file (and its test).
Each registered method's class is exported here too; users reach them as ``vlprune.methods.FasterVLM``
(``vlprune.api.MethodCatalog``, which is also what ``vlprune.methods()`` calls).
"""
import importlib
import pkgutil

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


