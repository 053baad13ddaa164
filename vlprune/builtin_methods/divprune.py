"""DivPrune (CVPR 2025): keep the most mutually different projected tokens (greedy max-min cosine distance).

Importance scores favour a few salient regions and keep near-duplicates of them; DivPrune instead keeps
a set that covers the image's feature space. It starts from the token whose nearest neighbour is
farthest, then k-1 times adds the token farthest (in min cosine distance) from those already kept.
Builds the full N x N distance matrix per image (576 x 576 floats = 1.3 MB, fine); ties go to the lowest
index, and an already kept token is never picked again, even when all remaining distances are zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import register_method
from .base import Context, Method, Selection


def cosine_distances(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) cosine distances in float32, clamped to [0, 2] against rounding. A token with
    NaN or inf features is at distance 0 from everything (it carries no direction), so the greedy pick
    never returns a token twice (NaN would win every argmax)."""
    unit = F.normalize(tokens.float(), dim=-1)
    return (1.0 - unit @ unit.transpose(1, 2)).nan_to_num_(nan=0.0).clamp_(0.0, 2.0)


def farthest_points(dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy max-min selection on (B, N, N) distances. Returns (indices (B, k) in pick order, radii (B, N)).

    ``radii``: for a picked token, its distance to the tokens picked before it (2, the largest cosine
    distance, for the first pick); for the rest, their distance to the whole kept set. Picked tokens
    therefore always hold the k largest radii.
    """
    b, n, _ = dist.shape
    eye = torch.eye(n, dtype=torch.bool, device=dist.device)
    nearest = dist.masked_fill(eye, float("inf")).amin(dim=-1)  # (B, N) distance to the nearest other token
    pick = nearest.argmax(dim=-1, keepdim=True)  # (B, 1); argmax returns the first (lowest) index on ties
    picks = [pick]
    radii = torch.zeros(b, n, dtype=dist.dtype, device=dist.device)
    radii.scatter_(1, pick, 2.0)
    gap = dist.gather(1, pick.unsqueeze(-1).expand(-1, -1, n)).squeeze(1)  # min distance to the kept set
    gap.scatter_(1, pick, -1.0)  # kept tokens can never win again (real distances are >= 0)
    for _ in range(k - 1):
        pick = gap.argmax(dim=-1, keepdim=True)
        radii.scatter_(1, pick, gap.gather(1, pick))
        gap = torch.minimum(gap, dist.gather(1, pick.unsqueeze(-1).expand(-1, -1, n)).squeeze(1))
        gap.scatter_(1, pick, -1.0)
        picks.append(pick)
    radii = torch.where(gap >= 0, gap, radii)
    return torch.cat(picks, dim=1), radii


@register_method("divprune")
@dataclass
class DivPrune(Method):
    summary = "max-min cosine diversity of the projected tokens (farthest-point greedy)"
    released_code = "`vbdi/divprune` @ 799e2d9"
    released = "matches the released code"
    stage = "projector"

    def select(self, tokens, k, ctx: Context) -> Selection:
        order, radii = farthest_points(cosine_distances(tokens), k)
        return Selection(order.sort(dim=-1).values, radii)
