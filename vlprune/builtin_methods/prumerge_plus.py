"""PruMerge+ (arXiv 2403.15388): keep the patches the last layer's [CLS] query singles out as IQR outliers,
top them up with evenly spread patches so the whole image stays covered, and let every kept patch absorb
its key-similar neighbours weighted by [CLS] attention, so pruned content is folded in rather than lost.
Deviations from the reference: always exactly k tokens (outliers capped or topped up with 2-D grid-cell
samples instead of a raster stride); no extra token merging all pruned patches; raster order; per-image
quartiles; merge weights normalised to a weighted average (``normalize=False`` restores the raw sum).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..errors import VlpruneError
from ..registry import register_method
from ..select import gather_tokens, grid_cells, per_image
from .base import Context, Method, Selection, Signal
from .uniform import cell_centres


@lru_cache(maxsize=64)
def _cell_layout(h: int, w: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cell index of every patch, is-centre mask) for the k cells of ``grid_cells(h, w, k)``, on CPU."""
    cell_of = torch.empty(h, w, dtype=torch.long)
    for i, (r0, r1, c0, c1) in enumerate(grid_cells(h, w, k)):
        cell_of[r0:r1, c0:c1] = i
    centre = torch.zeros(h * w, dtype=torch.bool)
    centre[list(cell_centres(h, w, k))] = True
    return cell_of.view(-1), centre


def full_width_cls_attention(q_cls, keys, k_cls) -> torch.Tensor:
    """Single-head [CLS] attention with all heads concatenated: softmax(q . [k_cls, K]^T / sqrt(D))[1:].

    q_cls, k_cls (B, heads, head_dim); keys (B, heads, N, head_dim) -> (B, N), float32.
    """
    b, h, n, d = keys.shape
    q = q_cls.float().reshape(b, h * d)
    k = keys.float().permute(0, 2, 1, 3).reshape(b, n, h * d)
    logits = torch.cat([(q * k_cls.float().reshape(b, h * d)).sum(-1, keepdim=True),
                        (k * q.unsqueeze(1)).sum(-1)], dim=1) / math.sqrt(h * d)  # not bmm: batch-invariant
    return torch.softmax(logits, dim=-1)[:, 1:]


@register_method("prumerge_plus")
@dataclass
class PruMergePlus(Method):
    """Score ``a`` = softmax(q_cls . [k_cls, K]^T / sqrt(D))[1:] of encoder layer ``layer``, all heads
    concatenated into one D = heads * head_dim wide head (the [CLS] key stays in the softmax).

    Outliers: ``a > Q3 + 1.5 * (Q3 - Q1)`` (linear-interpolated quartiles of the image's N scores).
    More than k outliers: the k highest. Otherwise all of them, plus the centre patches of the cells of
    ``grid_cells(h, w, k)`` that hold no outlier, highest score first, up to k (such cells always number
    at least k - #outliers). Merge: with ``nb(i)`` the ``neighbours`` patches (at most N - 1, never i
    itself) whose full-width keys are most cosine-similar to kept patch i's, output
    ``y_i = (x_i + sum_{j in nb(i)} a_j x_j) / (1 + sum_{j in nb(i)} a_j)``; ``sources`` holds exactly
    these coefficients (the kept patch always weighs at least 1/2). ``normalize=False`` drops the
    denominator: ``y_i = x_i + sum a_j x_j``, the reference's formula.
    """

    summary = "IQR outliers of last-layer [CLS] attention + grid samples, merged with key neighbours"
    merges = True
    released_code = "`42Shawn/LLaVA-PruMerge` @ 097c041"
    released = ("the merge matches; differs: always exactly k (outliers capped, or topped up with grid-cell centres "
                "instead of a raster stride), no extra token of all pruned patches, quartiles per image, raster "
                "order, merge weights normalised (`normalize=False`: the code's raw sum)")
    neighbours: int = 32
    normalize: bool = True
    layer: int = -1

    def __post_init__(self):
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 0:
            raise VlpruneError(
                f"neighbours={self.neighbours!r} is invalid for method='prumerge_plus' (allowed: an int >= 0)")
        if not isinstance(self.normalize, bool):
            raise VlpruneError(
                f"normalize={self.normalize!r} is invalid for method='prumerge_plus' (allowed: True, False)")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise VlpruneError(
                f"layer={self.layer!r} is invalid for method='prumerge_plus' (allowed: an int encoder layer index)")

    def signals(self):
        return [Signal("cls_query", self.layer), Signal("keys", self.layer), Signal("cls_key", self.layer)]

    def select(self, tokens, k, ctx: Context) -> Selection:
        b, n, _ = tokens.shape
        dev = tokens.device
        keys = ctx.signals[Signal("keys", self.layer)]
        scores = full_width_cls_attention(ctx.signals[Signal("cls_query", self.layer)], keys,
                                          ctx.signals[Signal("cls_key", self.layer)])
        kept = self.choose(scores, k, ctx.grid)

        # merge each kept patch with its most key-similar patches
        _, h, _, d = keys.shape
        unit = F.normalize(keys.float().permute(0, 2, 1, 3).reshape(b, n, h * d), dim=-1)
        weights = torch.zeros(b, k, n, dtype=torch.float32, device=dev)
        nb = min(self.neighbours, n - 1)
        if nb > 0:
            sim = per_image(torch.matmul, gather_tokens(unit, kept), unit.transpose(1, 2))  # (B, k, N)
            sim.scatter_(-1, kept.unsqueeze(-1), float("-inf"))  # never one's own neighbour
            near = sim.topk(nb, dim=-1).indices  # (B, k, nb)
            weights.scatter_(-1, near, scores.unsqueeze(1).expand(-1, k, -1).gather(-1, near))
        weights.scatter_(-1, kept.unsqueeze(-1), 1.0)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        merged = per_image(torch.matmul, weights, tokens.float()).to(tokens.dtype)
        return Selection(kept, scores, merged, weights)

    @staticmethod
    def choose(scores: torch.Tensor, k: int, grid: tuple[int, int]) -> torch.Tensor:
        """The k kept patches (B, k): IQR outliers first (by score), then free grid-cell centres (by score)."""
        b, n = scores.shape
        dev = scores.device
        q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75], device=dev, dtype=scores.dtype), dim=-1)
        outlier = scores > (q3 + 1.5 * (q3 - q1)).unsqueeze(-1)  # (B, N)
        cell_of, centre = (t.to(dev) for t in _cell_layout(*grid, k))
        crowded = torch.zeros(b, k, device=dev).index_add_(1, cell_of, outlier.float()) > 0  # (B, k)
        free_centre = centre & ~crowded[:, cell_of]
        # rank by category (outlier > free centre > rest), then by score; ties broken by raster order
        order = scores.sort(dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=dev).expand(b, -1))
        key = (2 * outlier.long() + free_centre.long()) * n + (n - 1 - rank)
        return key.topk(k, dim=-1).indices
