"""HiPrune (arXiv 2508.00553): anchors from a middle layer, their grid neighbours, then deep-layer picks.

Middle encoder layers attend to objects, deep ones to a few global "register" patches, so HiPrune
keeps round(k*alpha/5) anchors (top mean attention received at ``object_layer``), their up/down/left/right
neighbours as buffers (local context), and fills the rest with the top patches by attention received at
``deep_layer``. Exactly k always (if anchors + buffers exceed k, the buffers of weaker anchors are dropped).
Deviation: neighbours off the 2-D grid are simply absent; the reference adds +-1/+-W in the flat raster
and clamps to [0, N-1] (wrapping across rows, collapsing onto border tokens): ``reference_clamping=True``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import VlpruneError
from ..registry import register_method
from .base import Context, Method, Selection, Signal


def _check_layer(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise VlpruneError(f"{name} must be an int encoder layer index (negative counts from the end), got {value!r}")


@register_method("hiprune")
@dataclass
class HiPrune(Method):
    summary = "anchors from a middle layer + their 4 grid neighbours + deep-layer attention fill"
    released_code = "`Danielement321/HiPrune` @ 6e83a12"
    released = ("differs only at the grid's border: an anchor's neighbours off the 2-D grid are left out, where the "
                "code adds ±1/±W in the flat raster and clamps (wrapping across rows; `reference_clamping=True` "
                "restores it); exactly k where the code fails (anchors and buffers beyond k)")
    stage = "encoder"
    object_layer: int = 8
    deep_layer: int = -2
    alpha: float = 0.1
    reference_clamping: bool = False

    def __post_init__(self):
        _check_layer("object_layer", self.object_layer)
        _check_layer("deep_layer", self.deep_layer)
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0.0 <= a <= 1.0):
            raise VlpruneError(f"alpha must be a number in [0, 1] (the object-token proportion), got {a!r}")
        if not isinstance(self.reference_clamping, bool):
            raise VlpruneError(f"reference_clamping must be True or False, got {self.reference_clamping!r}")

    def signals(self):
        layers = dict.fromkeys((self.object_layer, self.deep_layer))  # one request if both are the same
        return [Signal("attention_received", layer) for layer in layers]

    def anchors_for(self, k: int) -> int:
        return min(k, round(k * self.alpha / 5))

    def select(self, tokens, k, ctx: Context) -> Selection:
        obj = ctx.signals[Signal("attention_received", self.object_layer)].mean(dim=1)  # (B, N)
        deep = ctx.signals[Signal("attention_received", self.deep_layer)].mean(dim=1)
        b, n = deep.shape
        h, w = ctx.grid
        if h * w != n:
            raise ValueError(f"grid {h}x{w} does not hold the {n} tokens the method was given")
        chosen = torch.zeros(b, n, dtype=torch.bool, device=deep.device)
        n_anchor = self.anchors_for(k)
        if n_anchor > 0:
            anchors = obj.topk(n_anchor, dim=-1).indices  # (B, A), strongest first
            chosen.scatter_(1, anchors, True)
            chosen |= self._buffers(anchors, chosen, h, w, k - n_anchor)
        # registers: everything chosen so far ranks first, then the deep score decides the rest
        key = deep.masked_fill(chosen, math.inf)
        indices = key.topk(k, dim=-1).indices.sort(dim=-1).values
        return Selection(indices, deep)

    def _buffers(self, anchors: torch.Tensor, is_anchor: torch.Tensor, h: int, w: int, room: int) -> torch.Tensor:
        """(B, N) mask of the anchors' neighbours that are not anchors, at most ``room`` per image.

        Each neighbour gets priority (anchor rank, direction up/down/left/right); a patch next to several
        anchors takes its best priority, and when there is too little room the lowest priorities stay.
        """
        b, a = anchors.shape
        n = h * w
        offsets = torch.tensor([-w, w, -1, 1], device=anchors.device)
        cand = anchors.unsqueeze(-1) + offsets  # (B, A, 4)
        if self.reference_clamping:
            valid = torch.ones_like(cand, dtype=torch.bool)
            cand = cand.clamp(0, n - 1)
        else:
            row, col = (anchors // w).unsqueeze(-1), (anchors % w).unsqueeze(-1)
            valid = torch.stack([row > 0, row < h - 1, col > 0, col < w - 1], dim=-1).squeeze(-2)
            cand = cand.clamp(0, n - 1)  # positions of invalid entries are ignored below
        worst = 4 * a  # larger than any real priority
        prio = torch.arange(4 * a, device=anchors.device).view(1, a, 4).expand(b, -1, -1)
        prio = torch.where(valid, prio, torch.full_like(prio, worst))
        best = torch.full((b, n), worst, dtype=prio.dtype, device=anchors.device)
        best.scatter_reduce_(1, cand.reshape(b, -1), prio.reshape(b, -1), reduce="amin")
        best.masked_fill_(is_anchor, worst)
        order = best.argsort(dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand(b, -1))
        return (best < worst) & (rank < room)
