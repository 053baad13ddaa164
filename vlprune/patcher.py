"""Base class of model-family patchers: the budget + method + record bookkeeping they all share.

A subclass knows one model family (where the layers are, how to read signals, how to feed survivors
on) and installs its hooks through ``self.ledger`` so that :meth:`remove` undoes exactly them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from .builtin_methods.base import DECODING, SIGNAL_KINDS, STAGES, Context, Method, Selection
from .errors import VlpruneError
from .hooks import Ledger
from .registry import _METHODS
from .select import gather_tokens


@dataclass
class ImageRecord:
    """What happened to one image in the most recent call (``Handle.last`` holds one per image).

    ``kept`` are indices into the encoder's patch grid in raster order (ascending); ``scores`` is the
    method's per-patch score (None for methods without one, or when nothing was pruned); ``sources``
    (after, before) is, for merging methods, each output token's weights over the input tokens;
    ``outliers`` (damro, in generate) the outlier tokens the contrasting pass saw, in the same index space.
    """

    row: int  # batch row (prompt) the image belongs to
    before: int
    after: int
    kept: torch.Tensor
    scores: torch.Tensor | None = None
    sources: torch.Tensor | None = None
    outliers: torch.Tensor | None = None
    layer: int | None = None  # stage "llm": the decoder layer from which only ``kept`` remain (earlier: all)
    counts: dict[int, int] | None = None  # stage "llm" plans: tokens in the LM from each drop layer on

    def __repr__(self) -> str:
        """Short: counts and the first kept indices, not every score (``print(handle.last)`` stays readable).
        A subclass declared with ``@dataclass(repr=False)`` shows its own fields the same way."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue  # an optional field left empty
            parts.append(f"{f.name}={_short(value)}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _short(value, head: int = 3, limit: int = 6) -> str:
    """A tensor in a few characters: a 1-D index tensor's first values, otherwise its size."""
    if not isinstance(value, torch.Tensor):
        return repr(value)
    if value.dim() == 1 and not value.is_floating_point() and not value.is_complex():
        shown = value[:limit if value.numel() <= limit else head].tolist()
        return "[" + ", ".join(map(str, shown)) + (", ...]" if value.numel() > limit else "]")
    if value.dim() == 1:
        return f"{value.numel()} values"
    return "x".join(map(str, value.shape)) if value.dim() else repr(value.item())


YES = "yes"
#: ``provides`` of a family that serves every stage and signal as the methods define them (LLaVA-1.5).
EVERYTHING = {**dict.fromkeys((*STAGES, DECODING, *SIGNAL_KINDS, "merges", "no_signals"), YES)}


class Patcher:
    """One model family's adapter. ``provides`` says what the family can serve, by capability, each as
    ``"yes"``, ``"substitute: how"`` or ``"no: why"``: the stages (``STAGES`` and ``"decoding"``), the
    signal kinds (``SIGNAL_KINDS``; ``"STAGE/kind"`` overrides a kind for one stage), ``"merges"`` (a method
    whose outputs average tokens) and ``"no_signals"`` (a method that reads none). What is not listed is
    not provided. Which methods a family serves follows from that (:meth:`support`): a patcher never names
    a method."""

    model_classes: tuple[str, ...] = ()
    provides: ClassVar[dict[str, str]] = {}

    @classmethod
    def support(cls, method_cls: type[Method]) -> str:
        """``"yes"``, ``"substitute: ..."`` or ``"no: ..."`` for a method class: its stage, each signal kind its
        default instance asks for, and whether it merges, against :attr:`provides` (the first "no" wins;
        substitutes are listed together)."""
        method, stage = method_cls.create(), method_cls.stage
        asks = method.encoder_signals(0) if stage == "in_encoder" else method.signals()
        caps = [stage] + [f"{stage}/{kind}" for kind in dict.fromkeys(s.kind for s in asks)]
        caps += [] if asks else [f"{stage}/no_signals"]
        caps += [f"{stage}/merges"] if method_cls.merges else []
        verdicts = [cls._provided(cap) for cap in caps]
        refused = [v for v in verdicts if v.startswith("no")]
        if refused:
            return refused[0]
        subs = dict.fromkeys(v.removeprefix("substitute: ") for v in verdicts if v.startswith("substitute"))
        return "substitute: " + "; ".join(subs) if subs else YES

    @classmethod
    def _provided(cls, cap: str) -> str:
        """A capability's verdict: the stage-specific entry ("in_encoder/keys") if any, else the general one."""
        general = cap.split("/", 1)[-1]
        what = f"stage {cap!r}" if "/" not in cap else (f"the {general} signal" if general in SIGNAL_KINDS else general)
        return cls.provides.get(cap, cls.provides.get(general, f"no: {cls.__name__} does not provide {what}"))

    def __init__(self, model, handle):
        self.model = model
        self.handle = handle
        self.ledger = Ledger()
        decoder = getattr(handle, "decoder", None)
        for method_cls in (type(handle.method), type(decoder) if decoder is not None else None):
            if method_cls is None:
                continue
            verdict = self.support(method_cls)
            if verdict.startswith("no"):
                served = [name for name, c in _METHODS.items() if not self.support(c).startswith("no")]
                raise VlpruneError(
                    f"method={method_cls.name!r} is not served on {type(model).__name__} ({type(self).__name__}): "
                    f"{verdict.removeprefix('no: ')}; methods served there: {', '.join(sorted(served))}")
        if type(handle.method).learned:
            from .learned import signature

            handle.method.check_base(signature(model))

    # -- to implement -----------------------------------------------------------------------------
    def install(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def remove(self) -> None:
        self.ledger.undo_all()

    # -- shared helpers ---------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.handle.active and not self.handle._disabled

    def keep_count(self, n: int) -> int:
        """Tokens an image of n keeps; 0 for methods that drop every image token (not budgeted)."""
        return 0 if self.handle.budget is None else self.handle.budget.tokens_for(n)

    def identity(self, rows: list[int], sizes: list[int], device, record=None) -> bool:
        """True when the budget keeps every token of every image (``sizes``, one per image, of batch
        ``rows``): the call then runs as unpatched, and ``handle.last`` records each image kept whole.
        ``record(i, row, kept)`` builds a family's own record (default: :class:`ImageRecord`)."""
        if any(self.keep_count(n) < n for n in sizes):
            return False
        record = record or (lambda _i, r, kept: ImageRecord(row=r, before=len(kept), after=len(kept), kept=kept))
        self.handle.last = [record(i, r, torch.arange(n, device=device)) for i, (r, n) in enumerate(zip(rows, sizes))]
        return True

    def prune(self, tokens: torch.Tensor, grid: tuple[int, int], signals: dict,
              k: int | None = None) -> tuple[torch.Tensor, Selection]:
        """Run the method on (B, N, D) tokens; return the (B, k, D) survivors and the sorted selection.
        ``k`` defaults to the budget's count for N tokens (a patcher that splits an image's budget over
        several views passes each view's share)."""
        k = self.keep_count(tokens.shape[1]) if k is None else k
        sel = self.handle.method.select(tokens, k, Context(grid=grid, signals=signals))
        if sel.indices.shape != (tokens.shape[0], k):
            raise RuntimeError(
                f"method {self.handle.method.name!r} returned indices of shape {tuple(sel.indices.shape)}, "
                f"expected {(tokens.shape[0], k)}"
            )
        indices, order = sel.indices.sort(dim=1)

        def reorder(t):
            return None if t is None else t.gather(1, order.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

        out = reorder(sel.tokens) if sel.tokens is not None else gather_tokens(tokens, indices)
        return out, Selection(indices, sel.scores, out if sel.tokens is not None else None, reorder(sel.sources))

    def records(self, rows: list[int], n: int, k: int, sel: Selection) -> list[ImageRecord]:
        """One :class:`ImageRecord` per image of a batch pruned with ``sel``."""
        def part(t, i):
            return None if t is None else t[i]

        return [ImageRecord(row=r, before=n, after=k, kept=sel.indices[i], scores=part(sel.scores, i),
                            sources=part(sel.sources, i)) for i, r in enumerate(rows)]
