"""Model-family patchers (installed as ``vlprune.patches``); importing registers them by class name.

Every public module in this folder is imported, so adding a family is adding its file. Each patcher
module imports its model library lazily, so an optional dependency is needed only when a model of
that family is patched. Modules starting with ``_`` hold hooks shared by several families.
"""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
