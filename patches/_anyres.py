"""LLaVA-NeXT's AnyRes layout of one image: which visual tokens each view (the base view, every crop)
contributes after unpadding, where they and the newlines sit among the image's placeholders, and the
budget split over views. Computed with the model's own functions, once per image size.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from vlprune.patcher import ImageRecord


@dataclass(repr=False)  # ImageRecord's short repr, with grids and newlines
class NextImageRecord(ImageRecord):
    """An :class:`ImageRecord` of one AnyRes image (see the module docstring for the index space)."""

    grids: tuple = ()  # ((s, s) base view, (H, W) unpadded high-res grid)
    newlines: int = 0  # newline tokens that reached the LM with this image

    @property
    def kept_base(self) -> torch.Tensor:
        """Kept raster indices of the base view's grid."""
        return self.kept[self.kept < self.grids[0][0] * self.grids[0][1]]

    @property
    def kept_high(self) -> torch.Tensor:
        """Kept raster indices of the unpadded high-res grid."""
        base = self.grids[0][0] * self.grids[0][1]
        return self.kept[self.kept >= base] - base


@dataclass(frozen=True)
class View:
    index: int  # 0: base view, c + 1: crop c (row-major over the crop grid), as in pixel_values
    local: torch.Tensor  # the view's patch tokens that reach the LM (raster indices of its s x s grid)
    visual: torch.Tensor  # the same tokens' indices in the image's visual index space
    grid: tuple[int, int]  # the rectangle they form


@dataclass(frozen=True)
class Layout:
    """Where one image's visual tokens and newlines sit in its block of placeholders."""

    side: int  # s: a view is s x s patches
    high: tuple[int, int]  # (H, W) of the unpadded high-res grid
    views: tuple[View, ...]  # views that keep at least one token after unpadding
    n_views: int  # views in pixel_values (base + every crop, fully padded ones included)

    @property
    def base(self) -> int:
        return self.side * self.side

    @property
    def visual(self) -> int:  # N: the budget's count
        return self.base + self.high[0] * self.high[1]

    @property
    def placeholders(self) -> int:
        return self.visual + self.high[0]

    def offsets(self, visual: torch.Tensor) -> torch.Tensor:
        """Offsets in the placeholder block of visual indices (the high-res rows are W + 1 long)."""
        high, width = (visual - self.base).clamp_min(0), max(self.high[1], 1)  # width 0: no high-res token
        return torch.where(visual < self.base, visual, self.base + high // width * (width + 1) + high % width)

    def kept_offsets(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(offsets of the kept visual tokens, offsets of the newlines that survive with them)."""
        # host sync: which high-res rows keep a token decides how many newlines (and so positions) the image keeps
        rows = ((kept[kept >= self.base] - self.base) // max(self.high[1], 1)).unique()
        return self.offsets(kept), self.base + rows * (self.high[1] + 1) + self.high[1]

    def record(self, row, kept, scores=None, sources=None) -> NextImageRecord:
        return NextImageRecord(row=row, before=self.visual, after=len(kept), kept=kept, scores=scores,
                               sources=sources, grids=((self.side, self.side), self.high),
                               newlines=len(self.kept_offsets(kept)[1]))


@lru_cache(maxsize=256)
def anyres_layout(size: tuple[int, int], pinpoints: tuple, image_px: int, side: int) -> Layout:
    """The layout of an image of ``size`` (height, width), computed with the model's own functions."""
    rows, cols = get_anyres_image_grid_shape(list(size), [list(p) for p in pinpoints], image_px)
    padded = torch.arange(rows * side * cols * side).view(1, rows * side, cols * side)
    grid = unpad_image(padded, list(size))[0]  # (H, W): indices into the padded high-res raster
    r, c = grid.flatten() // (cols * side), grid.flatten() % (cols * side)
    crop, local = r // side * cols + c // side, r % side * side + c % side
    base = side * side
    views = [View(0, torch.arange(base), torch.arange(base), (side, side))]
    for i in range(rows * cols):
        # host sync: none on a GPU - the layout is CPU tensors, computed once per image size (cached)
        at = (crop == i).nonzero().flatten()  # row-major in the unpadded grid = raster order inside the crop
        if len(at):
            view_rows = (local[at] // side).unique().numel()  # host sync: none on a GPU (as above)
            views.append(View(i + 1, local[at], base + at, (view_rows, len(at) // view_rows)))
    return Layout(side, tuple(grid.shape), tuple(views), 1 + rows * cols)


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """k split over views of ``sizes`` tokens in proportion to size: largest remainder, ties to the earlier."""
    total = sum(sizes)
    quotas = [k * n // total for n in sizes]
    order = sorted(range(len(sizes)), key=lambda v: (-(k * sizes[v] % total), v))
    for v in order[: k - sum(quotas)]:
        quotas[v] += 1
    return quotas
