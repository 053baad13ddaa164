"""A ledger of everything a patch installs, so ``remove()`` undoes exactly that and nothing else."""
from __future__ import annotations

_MISSING = object()


class Ledger:
    def __init__(self):
        self._undo: list = []

    def hook(self, removable) -> None:
        """Record a torch ``RemovableHandle`` (from ``register_forward_hook`` and friends)."""
        self._undo.append(removable.remove)

    def set_attr(self, obj, name: str, value) -> None:
        """Set an *instance* attribute (never a class attribute) and remember what was there before.

        An instance-level ``forward``/``generate`` may already exist (accelerate's offload hooks put one
        there); it is restored as it was, and a missing one is deleted again.
        """
        old = obj.__dict__.get(name, _MISSING)
        setattr(obj, name, value)

        def undo():
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old

        self._undo.append(undo)

    def undo_all(self) -> None:
        while self._undo:
            self._undo.pop()()
