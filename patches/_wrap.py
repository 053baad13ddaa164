"""Instance-level wrappers of a model's entry points (``forward``, ``generate``), recorded for undo."""
from __future__ import annotations

import functools
import inspect
import threading


def named_arguments(signature: inspect.Signature, args, kwargs) -> dict:
    """Positional + keyword arguments of a call as one name -> value dict (``**kwargs`` flattened)."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
            bound.update(bound.pop(name))
    return dict(bound)


def wrap_method(patcher, obj, name: str, impl):
    """Install ``impl(original, **named_args)`` as an instance-level ``obj.name`` (recorded for undo).

    Every wrapped entry point of one patcher runs under one re-entrant lock: a pruned call keeps its
    state on the patcher while it runs, so calls from several threads take turns (generate's inner
    forward calls re-enter it) instead of mixing each other's signals and selections."""
    original = getattr(obj, name)
    signature = inspect.signature(original)
    lock = patcher.__dict__.setdefault("call_lock", threading.RLock())

    @functools.wraps(original)  # keeps the signature that generate() inspects (position_ids etc.)
    def wrapper(*args, **kwargs):
        with lock:
            return impl(original, named_arguments(signature, args, kwargs))

    patcher.ledger.set_attr(obj, name, wrapper)
