"""Selection helpers shared by methods: top-k, the raster-order contract, grid partitions."""
from __future__ import annotations

import torch


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row, returned in ascending (raster) order. (B, N) -> (B, k)."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, D), indices (B, k) -> (B, k, D)."""
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def grid_cells(height: int, width: int, k: int) -> list[tuple[int, int, int, int]]:
    """Split a height x width patch grid into exactly k near-square rectangular cells, in raster order.

    Rows of cells ("bands") number ``round(sqrt(k * height / width))`` (at least 1, at most ``height``);
    the k cells are spread over the bands as evenly as possible and each band is cut into equal-width
    columns. For k = g*g on a grid divisible by g this is exactly ``adaptive_avg_pool2d(g, g)``'s cells;
    unlike a factorisation of k it works for every k (a prime k does not give a 1 x k strip).
    Returns (row0, row1, col0, col1) half-open bounds.
    """
    if not 1 <= k <= height * width:
        raise ValueError(f"k={k} cells do not fit a {height}x{width} grid")
    bands = min(height, max(1, round((k * height / width) ** 0.5)))
    while -(-k // bands) > width:  # a band cannot hold more cells than it has columns
        bands += 1
    cells = []
    for b in range(bands):
        r0, r1 = (b * height) // bands, ((b + 1) * height) // bands
        per_band = k // bands + (1 if b < k % bands else 0)
        for c in range(per_band):
            c0, c1 = (c * width) // per_band, ((c + 1) * width) // per_band
            cells.append((r0, r1, c0, c1))
    return cells


def grid_shape(n: int) -> tuple[int, int]:
    """The square patch grid of n tokens (CLIP-style encoders); error if n is not a square."""
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"{n} tokens do not form a square patch grid; the patcher must pass the grid explicitly")
    return side, side


def per_image(op, *tensors):
    """``op`` applied image by image: a batch gives bit for bit what its single images give (a batched
    matrix product may take another BLAS path, and sum in another order, than an unbatched one)."""
    return torch.stack([op(*(t[i] for t in tensors)) for i in range(tensors[0].shape[0])])
