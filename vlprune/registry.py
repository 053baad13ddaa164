"""Name -> method and model-class -> patcher tables, with lookups that explain their failures.

Methods register themselves with ``@register_method`` (the built-in ones when the ``vlprune`` package
is imported); patchers with ``@register_patcher``. The built-in patchers live a layer below the core,
so the core never imports them: they are found through the entry-point group ``vlprune.patchers``
(pyproject.toml, where another package may add its own) and imported at the first lookup. Patchers are
matched by class *name* (walking the MRO), so optional model libraries are imported only by the patcher
that needs them.
"""
from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points

from .errors import VlpruneError

_METHODS: dict[str, type] = {}
_PATCHERS: dict[str, type] = {}  # model class name -> patcher class


def register_method(name: str):
    """Class decorator: make a :class:`~vlprune.builtin_methods.base.Method` available as ``method=name``."""

    def deco(cls):
        if name in _METHODS and _METHODS[name] is not cls:
            raise VlpruneError(f"method name {name!r} is already registered by {_METHODS[name].__name__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def register_patcher(*class_names: str):
    """Class decorator: the patcher handles models whose class (or a base class) has one of these names."""

    def deco(cls):
        for cname in class_names:
            if cname in _PATCHERS and _PATCHERS[cname] is not cls:
                raise VlpruneError(f"model class {cname!r} already has patcher {_PATCHERS[cname].__name__}")
            _PATCHERS[cname] = cls
        cls.model_classes = tuple(class_names)
        return cls

    return deco


PATCHER_GROUP = "vlprune.patchers"
_plugins_loaded = False


def _load_patchers() -> None:
    """Import every module the ``vlprune.patchers`` entry points name (once), so they register."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    found = entry_points(group=PATCHER_GROUP)
    if not found:
        raise VlpruneError(f"no model patchers found (entry-point group {PATCHER_GROUP!r} is empty): vlprune's "
                           "package metadata is missing; install it (pip install -e .) rather than importing "
                           "it from a source folder")
    for ep in found:
        importlib.import_module(ep.value)
    _plugins_loaded = True


def method_names() -> list[str]:
    return sorted(_METHODS)


def summaries() -> dict[str, str]:
    """Registered method names with their one-line descriptions (``vlprune.methods()``)."""
    return {name: _METHODS[name].summary for name in method_names()}


def get_method(name: str) -> type:
    if not isinstance(name, str) or name not in _METHODS:
        close = difflib.get_close_matches(str(name).lower(), list(_METHODS), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise VlpruneError(f"unknown method={name!r}.{hint} Registered methods: {', '.join(sorted(_METHODS))}.")
    return _METHODS[name]


def supported_model_classes() -> list[str]:
    _load_patchers()
    return sorted(_PATCHERS)


def patcher_class(class_name: str) -> type:
    """The patcher registered for the model class named ``class_name`` (entry points loaded first)."""
    _load_patchers()
    if class_name not in _PATCHERS:
        raise VlpruneError(f"no patcher for model class {class_name!r}. Supported model classes: "
                           f"{', '.join(sorted(_PATCHERS))}.")
    return _PATCHERS[class_name]


def get_patcher(model) -> type:
    _load_patchers()
    for klass in type(model).__mro__:
        if klass.__name__ in _PATCHERS:
            return _PATCHERS[klass.__name__]
    raise VlpruneError(
        f"unsupported model class {type(model).__name__!r}. "
        f"Supported model classes: {', '.join(sorted(_PATCHERS))}."
    )
