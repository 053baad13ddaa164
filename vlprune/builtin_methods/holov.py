"""HoloV (NeurIPS 2025, arXiv 2510.02912): share the budget over image regions, not just hot spots.

Top-k by attention piles the budget onto a few highlighted regions; HoloV cuts the grid into crops, scores
each by its tokens' [CLS] attention plus the spread of their feature similarities, gives each crop a quota
proportional to its score (floors, leftovers to the heaviest crops) and keeps its top tokens by attention.
Checked against the released code (github.com/obananas/HoloV @ 1d2e65e, ``llava/model/utils.py`` L22-151,
``llava/model/llava_arch.py`` L239; ``tests/test_released_holov.py``). Deliberate departures, each with the
option that restores the release:

- crops are 2-D grid rectangles; the reference cuts the raster into contiguous runs (``crops_1d=True``);
- a one-token crop is scored on the same scale as the others; the reference scores the other crops by
  attention x 1e3 and a one-token crop by its raw attention, so such crops (there are some once crops
  exceed N/2) practically never get a token (``reference_singleton_scale=True``: one-token crops x 1e-3);
- crop count: by default ``int(1024 N / (576 k))``, clamped to [1, N], the rule of the authors' Qwen2.5-VL
  code (``qwen-model-HoloV/modeling_qwen2_5_vl.py`` L1916); it is the paper's ``1024 // k`` (App. A.3) at
  LLaVA-1.5's N = 576 and depends only on the keep ratio k / N. The released LLaVA code fixes 16 crops
  (with its fixed k = 64): ``crops=16``; ``crops=`` sets any fixed count (at most N are used);
- quota beyond a crop's size goes to the other crops by weight, so exactly k real tokens come out (the
  reference keeps the whole crop, drops the surplus and zero-pads to k; not reproduced);
- the kept tokens stay in raster order (the reference emits them crop by crop, by attention within a crop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..errors import VlpruneError
from ..registry import register_method
from ..select import grid_cells
from .base import Context, Method, Selection, Signal


@lru_cache(maxsize=64)
def crop_layout(height: int, width: int, crops: int, one_d: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices of each crop, padded with N: ((crops, max size) long, (crops,) sizes)."""
    n = height * width
    if one_d:  # contiguous runs of the raster, the first n % crops one token longer
        base, extra = divmod(n, crops)
        bounds = [c * base + min(c, extra) for c in range(crops + 1)]
        groups = [list(range(bounds[c], bounds[c + 1])) for c in range(crops)]
    else:
        groups = [[r * width + col for r in range(r0, r1) for col in range(c0, c1)]
                  for r0, r1, c0, c1 in grid_cells(height, width, crops)]
    members = torch.full((crops, max(len(g) for g in groups)), n, dtype=torch.long)
    for c, group in enumerate(groups):
        members[c, : len(group)] = torch.tensor(group, dtype=torch.long)
    return members, torch.tensor([len(g) for g in groups], dtype=torch.long)


def holistic_scores(tokens, attn, members, sizes, alpha: float) -> torch.Tensor:
    """Per-token holistic score inside each crop: (B, C, M), zero on padding slots.

    attention + alpha * gamma_c * variance, where the variance is that of a token's cosine similarities
    to its crop (self-similarity zeroed and, as in the reference, counted in the sum of squares; divided
    by M - 1) and gamma_c = mean attention / mean variance of the crop puts both terms on one scale.
    Note: with gamma_c per crop, a crop's mean score is (1 + alpha) x its mean attention whatever the
    features (the reference's eps aside), so the variance shapes the per-token scores, not the quotas.
    """
    b, n, d = tokens.shape
    valid = members < n  # (C, M)
    unit = F.normalize(tokens.float(), dim=-1)
    unit = torch.cat([unit, unit.new_zeros(b, 1, d)], dim=1)[:, members]  # (B, C, M, D)
    eye = torch.eye(members.shape[1], dtype=torch.bool, device=tokens.device)
    pairs = valid[:, :, None] & valid[:, None, :] & ~eye
    sim = (unit @ unit.transpose(-1, -2)).masked_fill(~pairs, 0.0)  # (B, C, M, M)
    denom = (sizes - 1).clamp(min=1).to(sim.dtype)[:, None]
    mean = sim.sum(-1) / denom
    dev = (sim - mean[..., None]).masked_fill(~valid[:, None, :], 0.0)
    var = (dev * dev).sum(-1) / denom * valid
    att = torch.cat([attn, attn.new_zeros(b, 1)], dim=1)[:, members]  # (B, C, M), 0 on padding
    mean_att, mean_var = att.abs().sum(-1) / sizes, var.abs().sum(-1) / sizes
    gamma = torch.where(mean_var > 0, mean_att / mean_var.clamp(min=torch.finfo(var.dtype).tiny), 0.0)
    return (att + alpha * gamma[..., None] * var) * valid


def _descending_ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based rank of every entry along the last dim, largest first; ties: lower position first."""
    order = values.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def _top_up(weights, count, eligible):
    """+1 for the ``count`` (B,) heaviest eligible crops of each row (ties: lower crop index)."""
    rank = _descending_ranks(torch.where(eligible, weights, torch.full_like(weights, -1.0)))
    return (rank < count[:, None]).long()


def allocate(weights: torch.Tensor, sizes: torch.Tensor, k: int) -> torch.Tensor:
    """Quotas (B, C) summing to k with quota <= size: floor(w * k), leftovers to the heaviest crops, and
    any quota beyond a crop's size handed to the crops with room left, by weight, until none overflows."""
    quotas = (weights * k).floor().long()
    quotas += _top_up(weights, k - quotas.sum(-1), torch.ones_like(quotas, dtype=torch.bool))
    for _ in range(sizes.shape[0] + 1):  # each round with a surplus fills at least one more crop
        over = (quotas - sizes).clamp(min=0)
        surplus = over.sum(-1)
        # host sync: one flag per round, ends the loop once nothing overflows (usually after round 0)
        if not bool(surplus.any()):
            break
        quotas -= over
        room = quotas < sizes
        share = weights * room
        total = share.sum(-1, keepdim=True)
        share = torch.where(total > 0, share / total.clamp(min=torch.finfo(share.dtype).tiny),
                            room / room.sum(-1, keepdim=True).clamp(min=1))
        extra = (share * surplus[:, None]).floor().long()
        quotas += extra + _top_up(share, surplus - extra.sum(-1), room)
    return quotas


@register_method("holov")
@dataclass
class HoloV(Method):
    summary = "per-crop quotas from a holistic (attention + similarity-spread) score, [CLS] top-k inside"
    released_code = "`obananas/HoloV` @ 1d2e65e"
    released = ("differs: 2-D crops (`crops_1d=True`: the code's raster runs), one-token crops on the others' scale "
                "(`reference_singleton_scale=True`: the code's 1e-3), crop count int(1024·N/(576·k)) from the "
                "authors' Qwen code (`crops=16`: the released LLaVA setting), overflow handed to other crops where "
                "the code zero-pads (no option), raster order")
    stage = "projector"
    crops: int | None = None
    alpha: float = 0.09
    tau: float = 1.0
    layer: int = -2
    crops_1d: bool = False
    reference_singleton_scale: bool = False

    def __post_init__(self):
        c = self.crops
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise VlpruneError(
                f"crops must be an int >= 1, or None for int(1024 * N / (576 * k)) clamped to [1, N]; got {c!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha >= 0):
            raise VlpruneError(
                f"alpha must be a finite number >= 0 (weight of the similarity variance), got {self.alpha!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not (
                math.isfinite(self.tau) and self.tau > 0):
            raise VlpruneError(f"tau must be a finite number > 0 (sharpness of the crop weights), got {self.tau!r}")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise VlpruneError(
                f"layer must be an int encoder layer index (negative counts from the end), got {self.layer!r}")
        if not isinstance(self.crops_1d, bool):
            raise VlpruneError(f"crops_1d must be True or False, got {self.crops_1d!r}")
        if not isinstance(self.reference_singleton_scale, bool):
            raise VlpruneError(f"reference_singleton_scale must be True or False (True: one-token crops scored "
                               f"x 1e-3, as in the released code), got {self.reference_singleton_scale!r}")

    def signals(self):
        return [Signal("cls_attention", self.layer)]

    def crops_for(self, k: int, n: int) -> int:
        """Crops for k kept of n: ``crops`` if set, else int(1024 n / (576 k)) (1024 // k at n = 576); in [1, n]."""
        return min(n, self.crops if self.crops is not None else max(1, (1024 * n) // (576 * k)))

    def select(self, tokens, k, ctx: Context) -> Selection:
        b, n, _ = tokens.shape
        h, w = ctx.grid
        if h * w != n:
            raise ValueError(f"grid {h}x{w} does not hold the {n} tokens the method was given")
        members, sizes = crop_layout(h, w, self.crops_for(k, n), self.crops_1d)
        members, sizes = members.to(tokens.device), sizes.to(tokens.device)
        valid = members < n
        attn = ctx.signals[Signal("cls_attention", self.layer)].mean(dim=1).float()  # (B, N)

        holistic = holistic_scores(tokens, attn, members, sizes, float(self.alpha))
        crop_score = holistic.sum(-1) / sizes  # (B, C), >= 0
        if self.reference_singleton_scale:  # the release: attention x 1e3 in crops of 2+, raw in crops of 1
            crop_score = crop_score * torch.where(sizes == 1, 1e-3, 1.0).to(crop_score.dtype)
        crop_score = crop_score.pow(self.tau)
        total = crop_score.sum(-1, keepdim=True)
        weights = torch.where(total > 0, crop_score / total.clamp(min=torch.finfo(total.dtype).tiny), sizes / n)
        quotas = allocate(weights, sizes, k)

        # inside each crop, the quota goes to the tokens with the most [CLS] attention
        att = torch.cat([attn, attn.new_full((b, 1), -math.inf)], dim=1)[:, members]  # (B, C, M)
        keep_slot = (_descending_ranks(att) < quotas[..., None]) & valid
        flat = members.reshape(1, -1).expand(b, -1)
        keep = torch.zeros(b, n + 1, dtype=torch.bool, device=tokens.device).scatter_(1, flat, keep_slot.reshape(b, -1))
        indices = (~keep[:, :n]).to(torch.uint8).argsort(dim=1, stable=True)[:, :k]  # kept tokens, ascending
        scores = holistic.new_zeros(b, n + 1).scatter_(1, flat, holistic.reshape(b, -1))[:, :n]
        return Selection(indices, scores)
