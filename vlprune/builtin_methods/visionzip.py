"""VisionZip (arXiv 2412.04467): keep the patches [CLS] attends to most ("dominant") and fold the others
into a few "contextual" tokens by key similarity, so the background is summarised instead of dropped.
The k outputs split into ``k - c`` dominant and ``c = floor(k * contextual_ratio + 0.5)`` contextual tokens
(at least one dominant); the default 10/64 is the README's 54 + 10 split of 64. Deviation: the reference
spends one dominant slot on the [CLS] token itself; our patchers hand over patch tokens only, so all k
outputs are patch-based (the top ``k - c`` patches, not ``k - c - 1`` plus [CLS]); no option restores it.
Outputs come in raster order of the patch each stands for (the reference: [CLS] and the dominant tokens in
raster order, then the contextual tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import VlpruneError
from ..registry import register_method
from ..select import gather_tokens, per_image
from .base import Context, Method, Selection, Signal


@register_method("visionzip")
@dataclass
class VisionZip(Method):
    """Dominant: the ``k - c`` patches with the largest layer-``layer`` [CLS] attention summed over heads.

    Contextual: the other ``R = N - (k - c)`` patches, in raster order, are compared by the cosine
    similarity of their layer-``layer`` keys averaged over heads. ``c`` targets sit at positions
    0, s, 2s, ... of that list with stride ``s = max(1, R // c)``; every other remaining patch joins the
    target it is most similar to; contextual output = ``x_target + mean(x_j for the m patches j that
    joined)`` (just ``x_target`` if none did). ``sources`` rows: one-hot for a dominant token; weight 1 on
    the target and 1/m on each member for a contextual one. ``indices``: the dominant patch / the target.
    """

    summary = "[CLS]-attention dominant tokens + key-similarity merged contextual tokens"
    merges = True
    released_code = "`dvlab-research/VisionZip` @ 3151f6d"
    released = ("differs: all k outputs are patches, where the code spends one dominant slot on [CLS] (our patchers "
                "pass patch tokens only; no option), and they come in raster order")
    contextual_ratio: float = 10 / 64
    layer: int = -2

    def __post_init__(self):
        r = self.contextual_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise VlpruneError(
                f"contextual_ratio={r!r} is invalid for method='visionzip' (allowed: a number in [0, 1))")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise VlpruneError(
                f"layer={self.layer!r} is invalid for method='visionzip' (allowed: an int encoder layer index)")

    def signals(self):
        return [Signal("cls_attention", self.layer), Signal("keys", self.layer)]

    def split(self, k: int) -> tuple[int, int]:
        """(dominant, contextual) counts for a budget of k tokens."""
        contextual = min(k - 1, max(0, math.floor(k * self.contextual_ratio + 0.5)))
        return k - contextual, contextual

    def select(self, tokens, k, ctx: Context) -> Selection:
        b, n, _ = tokens.shape
        scores = ctx.signals[Signal("cls_attention", self.layer)].sum(dim=1)  # (B, N)
        n_dom, n_ctx = self.split(k)
        dominant = scores.topk(n_dom, dim=-1).indices  # (B, n_dom)
        sources = torch.zeros(b, k, n, dtype=torch.float32, device=tokens.device)
        sources[:, :n_dom].scatter_(-1, dominant.unsqueeze(-1), 1.0)
        out = gather_tokens(tokens, dominant)
        if n_ctx == 0:
            return Selection(dominant, scores, out, sources)

        # the non-dominant patches, ascending raster order: (B, R)
        arange = torch.arange(n, device=tokens.device).expand(b, -1)
        is_dom = torch.zeros(b, n, dtype=torch.bool, device=tokens.device).scatter_(1, dominant, True)
        rest = torch.where(is_dom, arange + n, arange).sort(dim=-1).values[:, : n - n_dom]
        r = rest.shape[1]
        step = max(1, r // n_ctx)
        slots = torch.arange(r, device=tokens.device)
        picked = (slots % step == 0) & (slots < step * n_ctx)  # every step-th, the first c of them
        members_at = torch.sort(picked.to(torch.int8), stable=True).indices[: r - n_ctx]  # the others, in order
        targets, members = rest[:, slots[::step][:n_ctx]], rest[:, members_at]  # (B, c), (B, R - c)

        keys = F.normalize(ctx.signals[Signal("keys", self.layer)].mean(dim=1), dim=-1)  # (B, N, hd)
        sim = per_image(torch.matmul, gather_tokens(keys, members), gather_tokens(keys, targets).transpose(1, 2))
        assign = sim.argmax(dim=-1)  # (B, R - c): which target (of c) each member joins
        joined = torch.zeros(b, n_ctx, r - n_ctx, dtype=torch.float32, device=tokens.device)
        joined.scatter_(1, assign.unsqueeze(1), 1.0)  # joined[b, t, j] = member j joined target t
        weights = joined / joined.sum(dim=-1, keepdim=True).clamp(min=1.0)  # 1/m per member
        ctx_rows = torch.zeros(b, n_ctx, n, dtype=torch.float32, device=tokens.device)
        ctx_rows.scatter_(-1, members.unsqueeze(1).expand(-1, n_ctx, -1), weights)
        ctx_rows.scatter_(-1, targets.unsqueeze(-1), 1.0)
        sources[:, n_dom:] = ctx_rows
        merged = per_image(torch.matmul, ctx_rows, tokens.float()).to(tokens.dtype)
        return Selection(torch.cat([dominant, targets], dim=1), scores, torch.cat([out, merged], dim=1), sources)
