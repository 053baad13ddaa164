"""The public verbs: ``patch``, ``pruned``, ``methods`` and the :class:`Handle` they return."""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import asdict, dataclass, field

from .budget import Budget
from .errors import VlpruneError
from .registry import _METHODS, get_method, get_patcher, method_names

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

    def __init__(self, model, config: PatchConfig):
        self.model = model
        self.config = config
        cls = get_method(config.method)
        method = cls.create(**config.options)
        # a decoding method (damro) changes how tokens are generated, not which visual tokens the LM sees:
        # it is the handle's ``decoder``; ``method`` is the pruning it names (its ``pruner()``), budgeted as usual
        self.decoder = None if cls.prunes else method
        if self.decoder is not None:
            method = self.decoder.pruner()
        if self.decoder is not None and self.decoder.prune is None:
            if config.ratio is not None or config.keep is not None:
                raise VlpruneError(f"method={config.method!r} without prune= keeps every visual token; it takes no "
                                   f"ratio= or keep= (got ratio={config.ratio!r}, keep={config.keep!r}); name a "
                                   f"pruning method with prune=... to prune as well")
            self.budget = Budget(ratio=0.0)  # the identity: the unpruned computation
        elif type(method).budgeted:
            self.budget = Budget(ratio=config.ratio, keep=config.keep)
        elif config.ratio is not None or config.keep is not None:
            raise VlpruneError(f"method={method.name!r} decides by itself how many visual tokens to drop; "
                               f"it takes no ratio= or keep= (got ratio={config.ratio!r}, keep={config.keep!r})")
        else:
            self.budget = None
        self.method = method
        # record every option in effect, defaults included, so a saved config says what really ran
        self.config = config = dataclasses.replace(config, options=(self.decoder or method).options())
        self.last: list = []  # ImageRecord per image of the most recent call
        self.active = False
        self._disabled = False
        self._patcher = get_patcher(model)(model, self)

    def _install(self) -> None:
        self.active = True
        try:
            self._patcher.install()
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
    def disabled(self):
        """Temporarily run the model unpruned (e.g. for a side-by-side baseline)."""
        prev, self._disabled = self._disabled, True
        try:
            yield self
        finally:
            self._disabled = prev

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self):
        state = "active" if self.active else "removed"
        return f"<vlprune.Handle {self.config.to_json()} on {type(self.model).__name__} ({state})>"


def patch(model, method: str, *, ratio: float | None = None, keep: int | None = None,
          positions: str = "contiguous", **method_options) -> Handle:
    """Prune the visual tokens of ``model`` with ``method``, in place, through hooks.

    Exactly one of ``ratio`` (fraction of visual tokens removed, in [0, 1)) and ``keep`` (tokens kept
    per image, >= 1) - none for methods that are not budgeted (``visual_exit``). ``positions``: ``"contiguous"`` renumbers survivors' LM position ids as the papers
    do; ``"original"`` keeps each survivor's original position id. Other keywords are method options.
    Patching an already patched model replaces the earlier patch.
    """
    if positions not in POSITIONS:
        raise VlpruneError(f"positions must be one of {', '.join(map(repr, POSITIONS))}; got positions={positions!r}")
    config = PatchConfig(method=method, ratio=ratio, keep=keep, positions=positions, options=dict(method_options))
    handle = Handle(model, config)  # validates everything before the model is touched
    previous = model.__dict__.get("_vlprune")
    if previous is not None:
        previous.remove()
    handle._install()
    return handle


@contextlib.contextmanager
def pruned(model, method: str, **kwargs):
    """``with vlprune.pruned(model, "fastervlm", ratio=0.75) as handle: ...`` - removed on exit, even on error."""
    handle = patch(model, method, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()


def methods() -> dict[str, str]:
    """Registered method names with their one-line descriptions."""
    return {name: _METHODS[name].summary for name in method_names()}
