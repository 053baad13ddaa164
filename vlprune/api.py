"""The public verbs: ``patch``, ``pruned``, ``methods`` and the :class:`Handle` they return."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .budget import Budget
from .errors import VlpruneError
from .builtin_methods.base import Method
from .registry import _METHODS, get_method, get_patcher, summaries

if TYPE_CHECKING:
    import torch

    from .patcher import ImageRecord

POSITIONS = ("contiguous", "original")


@dataclass(frozen=True)
class PatchConfig:
    """What a patch does, as plain data (round-trips through JSON, e.g. to record an eval run)."""

    method: str
    ratio: float | None = None
    keep: int | None = None
    positions: str = "contiguous"
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "PatchConfig":
        return cls(**data)


class Handle:
    """A live patch on one model. ``remove()`` restores the model exactly; a second call is harmless."""

    def __init__(self, model: torch.nn.Module, config: PatchConfig) -> None:
        self.model = model
        self.config = config
        cls = get_method(config.method)
        method = cls.create(**config.options)
        # a decoding method (damro) changes how tokens are generated, not which visual tokens the LM sees:
        # it is the handle's ``decoder``; ``method`` is the pruning it names (its ``pruner()``), budgeted as usual
        self.decoder: Method | None = None if cls.prunes else method
        if self.decoder is not None:
            method = self.decoder.pruner()
        if self.decoder is not None and self.decoder.prune is None:
            if config.ratio is not None or config.keep is not None:
                raise VlpruneError(f"method={config.method!r} without prune= keeps every visual token; it takes no "
                                   f"ratio= or keep= (got ratio={config.ratio!r}, keep={config.keep!r}); name a "
                                   f"pruning method with prune=... to prune as well")
            self.budget: Budget | None = Budget(ratio=0.0)  # the identity: the unpruned computation
        elif type(method).budgeted:
            self.budget = Budget(ratio=config.ratio, keep=config.keep)
        elif config.ratio is not None or config.keep is not None:
            raise VlpruneError(f"method={method.name!r} decides by itself how many visual tokens to drop; "
                               f"it takes no ratio= or keep= (got ratio={config.ratio!r}, keep={config.keep!r})")
        else:
            self.budget = None
        self.method: Method = method
        # record every option in effect, defaults included, so a saved config says what really ran
        self.config = config = dataclasses.replace(config, options=(self.decoder or method).options())
        self._calls = threading.local()  # each thread's own last records (see ``last``)
        self._last: list[ImageRecord] = []
        self.active = False
        self._disabled = False
        self._patcher = get_patcher(model)(model, self)

    @property
    def last(self) -> list[ImageRecord]:
        """One :class:`ImageRecord` per image of the calling thread's most recent pruned call (a thread that
        has made none sees the most recent call of any thread)."""
        return getattr(self._calls, "last", self._last)

    @last.setter
    def last(self, records: list[ImageRecord]) -> None:
        self._calls.last = self._last = records

    def _install(self) -> None:
        self.active = True
        try:
            self._patcher.install()
            for name in ("__deepcopy__", "__reduce_ex__"):  # copy.deepcopy, pickle and torch.save look here first
                self._patcher.ledger.set_attr(self.model, name, _refuse_copy)
        except BaseException:
            self.remove()
            raise
        self.model._vlprune = self

    def remove(self) -> None:
        """Undo every hook and wrapper of this patch; the model behaves bit-identically to before."""
        if not self.active:
            return
        self.active = False
        self._patcher.remove()
        if self.model.__dict__.get("_vlprune") is self:
            del self.model.__dict__["_vlprune"]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[Handle]:
        """Temporarily run the model unpruned (e.g. for a side-by-side baseline)."""
        prev, self._disabled = self._disabled, True
        try:
            yield self
        finally:
            self._disabled = prev

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> bool:
        self.remove()
        return False

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<vlprune.Handle {self.config.to_json()} on {type(self.model).__name__} ({state})>"


def _method_config(method: str | Method, method_options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``patch``'s ``method`` (a registered name, or a method object carrying its options) as (name, options)."""
    if isinstance(method, str):
        return method, dict(method_options)
    if isinstance(method, type) and issubclass(method, Method):
        raise VlpruneError(f"method= takes a method name or a method object, not the class {method.__name__}; "
                           f"write {method.__name__}(...) or method={method.name!r}")
    if not isinstance(method, Method):
        raise VlpruneError(f"method must be a method name (see vlprune.methods()) or a method object such as "
                           f"vlprune.methods.FasterVLM(layer=-2); got method={method!r}")
    name = type(method).name
    if _METHODS.get(name) is not type(method):
        raise VlpruneError(f"method object of class {type(method).__name__} is not a registered method; "
                           f"register its class with @vlprune.register_method(name)")
    if method_options:
        raise VlpruneError(f"options given both in the method object ({method!r}) and as keyword arguments "
                           f"({', '.join(sorted(method_options))}); give them in one place: "
                           f"{type(method).__name__}(..., {next(iter(sorted(method_options)))}=...) or "
                           f"method={name!r} with keywords")
    return name, method.options()


def patch(model: torch.nn.Module, method: str | Method, *, ratio: float | None = None, keep: int | None = None,
          positions: str = "contiguous", **method_options: Any) -> Handle:
    """Prune the visual tokens of ``model`` with ``method``, in place, through hooks.

    ``method`` is a registered name (``"fastervlm"``, with its options as keywords) or a method object
    (``vlprune.methods.FasterVLM(layer=-3)``, options in the object, validated as keywords are).
    Exactly one of ``ratio`` (fraction of visual tokens removed, in [0, 1)) and ``keep`` (tokens kept
    per image, >= 1) - none for methods that are not budgeted (``visual_exit``). ``positions``: ``"contiguous"`` renumbers survivors' LM position ids as the papers
    do; ``"original"`` keeps each survivor's original position id. Other keywords are method options.
    Patching an already patched model replaces the earlier patch; if the new one fails (its arguments, or
    while installing), the earlier patch is left, or put back, active, and the error says so.
    """
    previous = getattr(model, "__dict__", {}).get("_vlprune")
    try:
        if positions not in POSITIONS:
            raise VlpruneError(f"positions must be one of {', '.join(map(repr, POSITIONS))}; "
                               f"got positions={positions!r}")
        name, options = _method_config(method, method_options)
        config = PatchConfig(method=name, ratio=ratio, keep=keep, positions=positions, options=options)
        handle = Handle(model, config)  # validates everything before the model is touched
        if previous is None:
            handle._install()
            return handle
        previous.remove()
        try:
            handle._install()  # undoes its own partial install on failure
        except BaseException:
            _reinstall(previous)
            raise
        return handle
    except VlpruneError as err:
        if previous is None or not previous.active:
            raise
        raise VlpruneError(f"{err}; the earlier patch (method={previous.config.method!r}) is still active") from err
    except Exception as err:
        if previous is not None and previous.active and hasattr(err, "add_note"):  # add_note: Python >= 3.11
            err.add_note(f"vlprune: the earlier patch (method={previous.config.method!r}) is still active")
        raise


def _refuse_copy(*_args) -> None:
    raise VlpruneError("a patched model cannot be deep-copied or pickled: its hooks and wrappers belong to this "
                       "instance and would run the original's weights; call vlprune.unpatch(model), copy or save "
                       "the plain model (save_pretrained and state_dict work while patched), then patch the copy")


def _reinstall(handle: Handle) -> None:
    """Put a removed handle back on its model, with a fresh patcher (as on its first install)."""
    handle._patcher = get_patcher(handle.model)(handle.model, handle)
    handle._install()


def unpatch(model: torch.nn.Module) -> bool:
    """Remove whatever vlprune patch is on ``model``; True if one was removed, False if there was none."""
    handle = getattr(model, "__dict__", {}).get("_vlprune")
    if handle is None:
        return False
    handle.remove()
    return True


@contextlib.contextmanager
def pruned(model: torch.nn.Module, method: str | Method, **kwargs: Any) -> Iterator[Handle]:
    """``with vlprune.pruned(model, "fastervlm", ratio=0.75) as handle: ...`` - removed on exit, even on error."""
    handle = patch(model, method, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()


class MethodCatalog:
    """``vlprune.methods``: called, ``{name: one-line summary}`` of every registered method; its attributes
    are the registered method classes by class name (``vlprune.methods.FasterVLM``), to pass configured
    objects to ``patch``. An object rather than a module, so that calling it needs no module trickery."""

    def __call__(self) -> dict[str, str]:
        return summaries()

    def _classes(self) -> dict[str, type]:
        return {cls.__name__: cls for cls in _METHODS.values()}

    def __getattr__(self, attr: str) -> type:
        classes = self._classes()
        if attr not in classes:
            raise AttributeError(f"vlprune.methods has no method class {attr!r}; registered: {', '.join(sorted(classes))}")
        return classes[attr]

    def __dir__(self) -> list[str]:
        return sorted(self._classes())

    def __repr__(self) -> str:
        return f"<vlprune.methods: {', '.join(sorted(self._classes()))}; call it for their summaries>"


methods = MethodCatalog()
