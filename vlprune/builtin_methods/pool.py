"""Pooling baseline ("downsample"): average the patch features over k near-square grid cells.

For k = g*g on a g-divisible grid this is ``adaptive_avg_pool2d`` to g x g; other k use the same
cell layout as ``uniform`` so the count is always exactly k. Each output token is a merge; its index
in ``handle.last`` is the centre patch of its cell. Averaging happens on the encoder features, before
the projector.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..registry import register_method
from ..select import grid_cells
from .base import Context, Method, Selection
from .uniform import cell_centres


@register_method("pool")
@dataclass
class Pool(Method):
    summary = "2-D average pooling of the patch grid to exactly k tokens"
    merges = True
    released_code = "none"
    released = "a baseline"

    def select(self, tokens, k, ctx: Context) -> Selection:
        h, w = ctx.grid
        weights = _cell_weights(h, w, k).to(device=tokens.device, dtype=tokens.dtype)
        pooled = torch.einsum("kn,bnd->bkd", weights, tokens)
        idx = torch.tensor(cell_centres(h, w, k), device=tokens.device).unsqueeze(0).expand(tokens.shape[0], -1)
        return Selection(idx, tokens=pooled, sources=weights.unsqueeze(0).expand(tokens.shape[0], -1, -1))


@lru_cache(maxsize=64)
def _cell_weights(h: int, w: int, k: int) -> torch.Tensor:
    """(k, h*w) averaging matrix, built once per geometry (a constant, like a conv kernel)."""
    weights = torch.zeros(k, h, w, dtype=torch.float64)
    for i, (r0, r1, c0, c1) in enumerate(grid_cells(h, w, k)):
        weights[i, r0:r1, c0:c1] = 1.0 / ((r1 - r0) * (c1 - c0))
    return weights.view(k, h * w)
