"""TCC, Token-level Correlation-guided Compression (arXiv 2407.14439): regions whose patches repeat each
other (blank margins, uniform backgrounds) carry little information, so they get fewer tokens; inside a
region the patches the [CLS] token correlates with most are kept. Built for cropped document images, here
one image is cut into ``crops`` 2-D regions. Deviations (the paper's code was never released, details are
inferred; see the class docstring): exact budget k split by density, top-q instead of sampling, no
global-view outlier branch, layer -2 instead of an unnamed "low" layer (set ``layer`` to change it).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..errors import VlpruneError
from ..registry import register_method
from ..select import grid_cells, per_image, topk_indices
from .base import Context, Method, Selection, Signal


@lru_cache(maxsize=64)
def _crop_layout(h: int, w: int, crops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(crop index of every patch (N,), patches per crop (crops,)) for ``grid_cells(h, w, crops)``, on CPU."""
    crop_of = torch.empty(h, w, dtype=torch.long)
    for i, (r0, r1, c0, c1) in enumerate(grid_cells(h, w, crops)):
        crop_of[r0:r1, c0:c1] = i
    crop_of = crop_of.view(-1)
    return crop_of, torch.bincount(crop_of, minlength=crops)


def allocate(weights: torch.Tensor, sizes: torch.Tensor, k: int) -> torch.Tensor:
    """Split k tokens over crops in proportion to ``weights`` (B, C), no crop above its size (C,).

    Water-filling: a crop whose proportional share exceeds its size is filled and the overflow is shared
    by the others (again in proportion to their weights; by size once only zero-weight crops have room;
    by size everywhere if a row's weights are all zero). The real-valued shares are then rounded by
    largest remainder (ties: lower crop index first). Returns (B, C) int64 quotas summing to k.
    """
    b, c = weights.shape
    cap = sizes.to(weights.device, torch.float64).expand(b, c)
    w = weights.double()
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, cap)
    full = torch.zeros(b, c, dtype=torch.bool, device=weights.device)
    for _ in range(c + 1):  # each round fills at least one more crop, or nothing changes
        left = k - torch.where(full, cap, 0.0).sum(-1, keepdim=True)
        free = torch.where(full, 0.0, w)
        free = torch.where(free.sum(-1, keepdim=True) > 0, free, torch.where(full, 0.0, cap))
        share = torch.where(full, cap, left * free / free.sum(-1, keepdim=True).clamp_min(1e-300))
        full = full | (share > cap)
    share = torch.minimum(share, cap)
    quota = share.floor()
    extra = k - quota.sum(-1, keepdim=True).long()
    frac = torch.where(quota >= cap, -1.0, share - quota)
    order = frac.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(c, device=weights.device).expand(b, -1))
    return quota.long() + (rank < extra).long()


def rank_within_groups(scores: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """0-based rank of each token's score among the tokens of its group (descending; ties: raster order)."""
    b, n = scores.shape
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    hits = F.one_hot(group[order], groups).cumsum(dim=1)  # (B, N, groups): running count per group
    pos = hits.gather(-1, group[order].unsqueeze(-1)).squeeze(-1) - 1
    return torch.empty_like(pos).scatter_(-1, order, pos)


@register_method("tcc")
@dataclass
class TCC(Method):
    """Per crop of ``grid_cells(h, w, crops)`` (``crops`` is capped at N):

    1. Redundancy (patch-patch correlation): cosine similarity of the layer-``layer`` keys, all heads
       concatenated; a patch is redundant when some *other* patch of its crop is more similar than
       ``threshold``. Information density = fraction of the crop's patches that are not redundant.
    2. Quota: k is split over the crops in proportion to density x size (= non-redundant patches),
       rounded to integers that sum to exactly k, no crop above its size, overflow passed on
       (:func:`allocate`).
    3. Sampling (CLS-patch correlation): each crop keeps its quota of patches with the largest
       layer-``layer`` [CLS] attention (head mean).

    From the paper (abstract, architecture figure, a public review): patch-patch correlation of the
    attention keys decides redundancy, hence each sub-image's information density and sampling number;
    the [CLS] query against the patch keys gives a distribution that guides which tokens are taken; the
    kept features are the encoder's output features. Inferred here: the "similar to another patch above a
    threshold" rule and its value (0.9 is our choice), quotas proportional to the non-redundant count and
    scaled to the budget (the paper keeps an adaptive count), deterministic top-q rather than random
    draws, the layer (the paper reads q/k at an unspecified low layer), 2-D crops of one image instead of
    DocOwl's sub-images. Not implemented: the paper's global-view branch (IQR outliers of deep-layer
    [CLS] attention, as in PruMerge) that is aggregated with the per-crop tokens.
    """

    summary = "per-crop quotas from key-similarity information density, [CLS]-attention top-k inside"
    released_code = "none"
    released = ("the paper's code was never released; the details are inferred from the paper (see the module "
                "docstring)")
    crops: int = 4
    threshold: float = 0.9
    layer: int = -2

    def __post_init__(self):
        if isinstance(self.crops, bool) or not isinstance(self.crops, int) or self.crops < 1:
            raise VlpruneError(f"crops={self.crops!r} is invalid for method='tcc' (allowed: an int >= 1)")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not -1 <= t <= 1:
            raise VlpruneError(f"threshold={t!r} is invalid for method='tcc' (allowed: a number in [-1, 1])")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise VlpruneError(
                f"layer={self.layer!r} is invalid for method='tcc' (allowed: an int encoder layer index)")

    def signals(self):
        return [Signal("cls_attention", self.layer), Signal("keys", self.layer)]

    def redundant(self, keys: torch.Tensor, crop_of: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: another patch of the same crop has key cosine similarity above ``threshold``."""
        b, h, n, d = keys.shape
        unit = F.normalize(keys.float().permute(0, 2, 1, 3).reshape(b, n, h * d), dim=-1)
        sim = per_image(torch.matmul, unit, unit.transpose(1, 2))
        other = (crop_of[:, None] == crop_of[None, :]) & ~torch.eye(n, dtype=torch.bool, device=keys.device)
        return (sim.masked_fill(~other, float("-inf")).amax(dim=-1) > self.threshold)

    def select(self, tokens, k, ctx: Context) -> Selection:
        b, n, _ = tokens.shape
        h, w = ctx.grid
        crops = min(self.crops, h * w)
        crop_of, sizes = (t.to(tokens.device) for t in _crop_layout(h, w, crops))
        fresh = ~self.redundant(ctx.signals[Signal("keys", self.layer)], crop_of)
        informative = torch.zeros(b, crops, dtype=torch.float64, device=tokens.device)
        informative.index_add_(1, crop_of, fresh.double())  # non-redundant patches per crop
        quota = allocate(informative, sizes, k)  # (B, crops)
        scores = ctx.signals[Signal("cls_attention", self.layer)].mean(dim=1)
        keep = rank_within_groups(scores, crop_of, crops) < quota[:, crop_of]
        return Selection(topk_indices(keep.float(), k), scores)
