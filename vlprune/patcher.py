"""Base class of model-family patchers: the budget + method + record bookkeeping they all share.

A subclass knows one model family (where the layers are, how to read signals, how to feed survivors
on) and installs its hooks through ``self.ledger`` so that :meth:`remove` undoes exactly them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .errors import VlpruneError
from .hooks import Ledger
from .builtin_methods.base import Context, Selection
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


class Patcher:
    model_classes: tuple[str, ...] = ()
    stages: tuple[str, ...] = ("encoder",)
    decoders: tuple[str, ...] = ()  # decoding methods (``prunes = False``, e.g. damro) the patcher serves

    def __init__(self, model, handle):
        self.model = model
        self.handle = handle
        self.ledger = Ledger()
        if handle.method.stage not in self.stages:
            raise VlpruneError(
                f"method={handle.method.name!r} acts at stage {handle.method.stage!r}, which "
                f"{type(self).__name__} does not support (supported stages: {', '.join(self.stages)})"
            )
        decoder = getattr(handle, "decoder", None)
        if decoder is not None and decoder.name not in self.decoders:
            raise VlpruneError(f"method={decoder.name!r} is not served on {type(model).__name__} ({type(self).__name__}); "
                               "see the README's model x method support table for the models that serve it")

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
