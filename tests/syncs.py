"""Find host synchronisations that vlprune's own code makes, on the CPU.

On a GPU, ``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero()``, a boolean-mask index and their kin
stall the host until the device catches up. A ``TorchFunctionMode`` sees every such call; the one whose
innermost non-torch caller is a file of vlprune (the core or the patchers) is recorded with that file and
line. Calls made by transformers or the original model code are theirs: the unpatched model makes them
too. A place that needs its sync (a count that sets a shape, say) says so in a ``# host sync:`` comment
on that line or the one above; ``unexplained()`` lists the others.
"""
from __future__ import annotations

import linecache
import os
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import vlprune
import vlprune.patches

ROOTS = tuple(str(Path(p).resolve()) + os.sep for p in (Path(vlprune.__file__).parent,
                                                        Path(vlprune.patches.__file__).parent))
TORCH = str(Path(torch.__file__).parent.resolve()) + os.sep
SYNCING = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "argwhere", "unique",
           "unique_consecutive", "masked_select", "equal", "allclose", "cpu", "numpy", "__array__"}
MARKER = "# host sync:"


def _bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    parts = idx if isinstance(idx, tuple) else (idx,)
    return any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts)


def _vlprune_caller(frame) -> tuple[str, int] | None:
    """(file, line) of the innermost non-torch caller above ``frame`` when it is vlprune's, else None."""
    while frame is not None and os.path.realpath(frame.f_code.co_filename).startswith(TORCH):
        frame = frame.f_back
    if frame is None:
        return None
    path = os.path.realpath(frame.f_code.co_filename)
    return (path, frame.f_lineno) if path.startswith(ROOTS) else None


def _explained(path: str, line: int) -> bool:
    """A ``# host sync:`` comment on the line or the one above."""
    return MARKER in linecache.getline(path, line) + linecache.getline(path, line - 1)


class SyncRecorder(TorchFunctionMode):
    """Records (file, line, call) for each syncing call whose innermost non-torch caller is vlprune's."""

    def __init__(self):
        super().__init__()
        self.sites: dict[tuple[str, int], str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        syncing = name in SYNCING or (name in ("__getitem__", "__setitem__") and _bool_index(args)) or (
            name == "repeat_interleave" and len(args) > 1 and torch.is_tensor(args[1])
            and (kwargs or {}).get("output_size") is None)
        if syncing:
            site = _vlprune_caller(sys._getframe(1))
            if site is not None:
                self.sites.setdefault(site, name)
        return func(*args, **(kwargs or {}))

    def unexplained(self) -> list[str]:
        """Sites without a ``# host sync:`` comment on their line or the line above, as 'file:line call: code'."""
        out = []
        for (path, line), name in sorted(self.sites.items()):
            if not _explained(path, line):
                code = linecache.getline(path, line).strip()
                out.append(f"{Path(path).relative_to(Path(path).parents[1])}:{line} {name}: {code}")
        return out


class CudaSyncGuard(TorchFunctionMode):
    """On a GPU: every torch call made from a vlprune line without a ``# host sync:`` comment runs under
    ``torch.cuda.set_sync_debug_mode("error")``, so any synchronising op there raises (listed in SYNCING
    or not); calls from other code (transformers, the original model) and explained lines run as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None and os.path.realpath(frame.f_code.co_filename).startswith(TORCH):
            frame = frame.f_back
        strict = False
        if frame is not None:
            path = os.path.realpath(frame.f_code.co_filename)
            if path.startswith(ROOTS):
                line = frame.f_lineno
                strict = MARKER not in linecache.getline(path, line) + linecache.getline(path, line - 1)
        if not strict:
            return func(*args, **(kwargs or {}))
        torch.cuda.set_sync_debug_mode("error")
        try:
            return func(*args, **(kwargs or {}))
        finally:
            torch.cuda.set_sync_debug_mode("default")
