"""Uniform baseline: the patch nearest the centre of each of k evenly spread grid cells.

Cells come from :func:`vlprune.select.grid_cells`, so every k gives k distinct, evenly spread
patches in 2-D (not every n-th token of the raster, which would leave whole rows empty).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..registry import register_method
from ..select import grid_cells
from .base import Context, Method, Selection


@lru_cache(maxsize=64)
def cell_centres(height: int, width: int, k: int) -> tuple[int, ...]:
    """Raster index of the (upper-left) centre patch of each cell."""
    return tuple(((r0 + r1 - 1) // 2) * width + (c0 + c1 - 1) // 2 for r0, r1, c0, c1 in grid_cells(height, width, k))


@register_method("uniform")
@dataclass
class Uniform(Method):
    summary = "evenly spaced patches on the 2-D grid"
    released_code = "none"
    released = "a baseline"

    def select(self, tokens, k, ctx: Context) -> Selection:
        h, w = ctx.grid
        idx = torch.tensor(cell_centres(h, w, k), device=tokens.device).unsqueeze(0).expand(tokens.shape[0], -1)
        return Selection(idx)
