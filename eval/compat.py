"""Compatibility of lmms-eval 0.7.3 with the packages pip installs beside it today.

lmms-eval's ``simple_evaluate`` first patches ``filelock._api.FileLockMeta`` (a cross-class singleton
cache for the lock files of ``datasets``). filelock 4 has no ``filelock._api`` module, so every
evaluation dies with ``ModuleNotFoundError: No module named 'filelock._api'``. With filelock >= 4 we
register a stand-in module whose ``FileLockMeta`` is a placeholder class: lmms-eval's patch then changes
nothing, and locks behave as filelock 4 makes them (its locks are re-entrant per path already). Installed
from the ``lmms_eval.models`` entry point, so plain ``lmms-eval`` runs get it too.
"""
from __future__ import annotations

import importlib
import sys
import types


def ensure_filelock_api() -> bool:
    """Provide ``filelock._api`` where filelock lacks it; True when the stand-in was installed."""
    try:
        importlib.import_module("filelock._api")
        return False
    except ImportError:
        pass
    import filelock

    class _Placeholder:  # lmms-eval replaces __call__ on this class; nothing ever instantiates it
        def __call__(cls, *args, **kwargs):  # pragma: no cover
            raise TypeError("placeholder")

    shim = types.ModuleType("filelock._api")
    shim.__doc__ = "vlprune stand-in for filelock<4's private module (see vlprune.eval.compat)"
    shim.FileLockMeta = _Placeholder
    shim.BaseFileLock = getattr(filelock, "BaseFileLock", object)
    sys.modules["filelock._api"] = shim
    return True
