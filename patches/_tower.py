"""Pruning on a CLIP-style vision tower and its projector, shared by the LLaVA families (HF LLaVA-1.5,
HF LLaVA-NeXT, the original LLaVA code).

A family builds one :class:`TowerPruning` with where things are (the tower's layers, the projector, the
encoder layer the projector reads) and runs its own tower call inside :meth:`TowerPruning.encoding`,
which arms the taps and hooks for that call only. By stage:

- ``encoder``: a pre-hook on the projector hands the method the patch features and the signals tapped
  during the pass, and passes only the k survivors on, so the projector runs on k tokens;
- ``projector``: the same in a post-hook, among the projected features;
- ``in_encoder``: pre-hooks between encoder layers run the method's step on the signals of the layer
  before and apply its cut, the whole batch at once: images that keep different counts are padded to
  the longest, real tokens first, and the padding is masked in attention and in the signals.

A family that runs the projector itself (NeXT, per view) passes no projector and prunes the features
the pass returns with ``patcher.prune`` and :meth:`TowerPruning.signals`.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from vlprune.builtin_methods.base import Selection
from vlprune.errors import VlpruneError
from vlprune.select import gather_tokens, grid_shape
from vlprune.sequence import padding_mask, real_tokens

from ._clip import ClipTaps

TOKEN_KINDS = ("cls_attention", "attention_received", "keys", "values")  # signals with a patch-token axis (dim 2)


def view_signals(signals: dict, row: int, local: torch.Tensor) -> dict:
    """One tower row's signals, restricted to the patch tokens ``local``."""
    return {s: (v[row : row + 1, :, local] if s.kind in TOKEN_KINDS else v[row : row + 1]) for s, v in signals.items()}


def visible_first(visible: list, n: int, device) -> tuple[torch.Tensor, list[int]]:
    """(order (B, n): each row's visible patch tokens ascending, then the rest; visible count per row) for
    ``visible``, one index tensor (or None: all n) per tower row."""
    seen = torch.ones(len(visible), n, dtype=torch.bool, device=device)
    for row, local in enumerate(visible):
        if local is not None:
            seen[row] = False
            seen[row, local.to(device)] = True
    order = (~seen).to(torch.uint8).argsort(dim=1, stable=True)  # a stable sort: ascending within each part
    return order, [n if local is None else len(local) for local in visible]


def reorder_signals(signals: dict, order: torch.Tensor) -> dict:
    """The signals with each row's patch tokens (dim 2) in ``order`` (B, t)."""
    def one(v):
        index = order.view(order.shape[0], 1, order.shape[1], *[1] * (v.dim() - 3))
        return v.gather(2, index.expand(v.shape[0], v.shape[1], -1, *v.shape[3:]))

    return {s: (one(v) if s.kind in TOKEN_KINDS else v) for s, v in signals.items()}


def apply_cut(state: dict, hidden: torch.Tensor, keep: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """An in-encoder cut on ``hidden`` (B, 1+t, D): [CLS] and the ``keep`` (B, t') patch tokens stay, and
    ``state``'s survivors (``orig``), ``counts``, real tokens (``real``) and additive padding mask (``mask``,
    (B, 1, T, T) or None) follow them. Returns the new hidden states."""
    state["orig"], state["counts"] = state["orig"].gather(1, keep), counts
    state["real"] = real_tokens(counts, keep.shape[1], hidden.device)
    state["mask"] = padding_mask(state["real"], hidden.dtype)
    return torch.cat([hidden[:, :1], gather_tokens(hidden[:, 1:], keep)], dim=1)


class TowerPruning:
    def __init__(self, patcher, layers, projector=None, feature_layer: int | None = None):
        """``feature_layer``: the encoder layer whose output the projector reads (in_encoder methods only)."""
        self.patcher = patcher
        self.busy = False
        self.state = None  # the running pass's in-encoder state (see encoding)
        self.selection = None  # the running pass's selection, once made
        method = patcher.handle.method
        self.plan = None
        if method.stage == "in_encoder":
            self.plan = method.encoder_plan(feature_layer)
            if not self.plan or self.plan[-1] >= feature_layer or self.plan[0] < 0:
                raise VlpruneError(f"method={method.name!r} planned prune layers {self.plan}, which must lie in "
                                   f"0..{feature_layer - 1} (before the feature layer {feature_layer})")
            requests = [sig for l in self.plan for sig in method.encoder_signals(l)]
            self.taps = ClipTaps(layers, requests, patcher.ledger, lambda: self.busy, key_mask=self._real_keys)
            for l in self.plan:
                hook = functools.partial(self._between_layers, l)
                patcher.ledger.hook(layers[l + 1].register_forward_pre_hook(hook, with_kwargs=True))
        else:
            self.taps = ClipTaps(layers, method.signals(), patcher.ledger, lambda: self.busy)
        if projector is None:
            return
        if method.stage == "projector":  # select among the projected features
            patcher.ledger.hook(projector.register_forward_hook(self._after_projector))
        else:  # select before the projector: it runs on k tokens only
            patcher.ledger.hook(projector.register_forward_pre_hook(self._before_projector))

    @contextmanager
    def encoding(self, n: int, batch: int, k, device, visible: list | None = None):
        """Taps and hooks live for one tower pass over ``batch`` images of ``n`` patches, each pruned to
        ``k`` (or ``k[i]`` for row i: NeXT's views, each to its quota). ``visible``: per row, the patch
        tokens an in-encoder method may pick from at its first cut (None: all; the rest are padding of the
        family's layout: NeXT's unpadding). Yields self: ``selection`` once made, ``state["orig"]`` the
        surviving patch indices of an in-encoder pass (rows of different ``k``: real tokens first)."""
        self.busy = True
        order = counts = None
        if visible is not None and any(v is not None for v in visible):
            order, counts = visible_first(visible, n, device)
        self.state = {"orig": torch.arange(n, device=device).expand(batch, -1), "score": None, "target": k,
                      "counts": counts, "real": None, "mask": None, "order": order}
        try:
            yield self
        finally:
            self.busy, self.selection, self.state = False, None, None
            self.taps.take()

    def signals(self) -> dict:
        """The signals tapped so far in this pass (taken: a second call returns only newer ones)."""
        return self.taps.take()

    # -- in_encoder -------------------------------------------------------------------------------
    def _between_layers(self, layer, _module, args, kwargs):
        """Before layer ``layer`` + 1: the method's step on ``layer``'s signals, its cut applied to the
        hidden states, and, while a batch's images keep different counts, their padding masked."""
        if not self.busy:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        state = self.state
        keep, state["score"], counts = self._step(layer, self.taps.take(), state)
        if keep is not None:  # the real tokens and the mask hiding the padding change only at a cut
            hidden = apply_cut(state, hidden, keep, counts)
        mask = state["mask"]
        if keep is None and mask is None:  # the method only updated its running score
            return None
        if len(args) >= 2:  # CLIP / DINOv2 layers take (hidden_states, attention_mask, ...)
            return (hidden, mask if mask is not None else args[1], *args[2:]), kwargs
        kwargs = {**kwargs, **({"attention_mask": mask} if mask is not None else {})}
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _step(self, layer, signals, state):
        """The method's step after ``layer``: (indices of the current patch tokens to keep or None, new
        score, real tokens per image). Until the first cut it sees each row's ``visible`` tokens first,
        counted as its real ones (the rest as padding), and its cut is mapped back through that order."""
        order = state["order"]
        if order is not None:
            signals = reorder_signals(signals, order)
        method = self.patcher.handle.method
        keep, score, counts = method.encoder_step(layer, self.plan[-1] - layer, signals, state["score"],
                                                  state["target"], state["counts"])
        if order is None:
            return keep, score, counts
        if keep is None and layer == self.plan[-1]:  # a family's quotas are below the visible counts (else: identity)
            raise RuntimeError(f"{method.name} made no cut, so the padding of the family's layout would stay")
        if keep is None:
            return keep, score, counts
        state["order"] = None
        return order.gather(1, keep), score, counts

    def _real_keys(self):
        """The real tokens ([CLS] included) of the hidden states now entering a layer, or None if unpadded."""
        return self.state["real"] if self.state else None

    # -- encoder / projector ----------------------------------------------------------------------
    def _select(self, feats):
        if self.plan is not None:  # already pruned inside the encoder
            k = self.state["target"]
            if feats.shape[1] != k:
                raise RuntimeError(f"{self.patcher.handle.method.name} left {feats.shape[1]} tokens, expected {k}")
            self.selection = Selection(self.state["orig"])
            return feats
        survivors, self.selection = self.patcher.prune(feats, grid_shape(feats.shape[1]), self.taps.take())
        return survivors

    def _before_projector(self, _module, args):
        return (self._select(args[0]),) if self.busy else None

    def _after_projector(self, _module, _args, output):
        return self._select(output) if self.busy else None
