"""Random baseline: k tokens drawn uniformly without replacement, reproducible from ``seed``.

The draw depends only on ``seed`` and the number of tokens, not on the batch: every image of a call
(and of every later call) gets the same random subset, so a batch equals its single runs and a sweep
is repeatable. Average over several seeds for a random-baseline curve. The generator lives on the
tokens' device (CPU and CUDA draws differ from each other).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_method
from ..select import topk_indices
from .base import Context, Method, Selection


@register_method("random")
@dataclass
class Random(Method):
    summary = "uniformly random tokens (seeded; same subset for every image)"
    released_code = "none"
    released = "a baseline"
    seed: int = 0

    def select(self, tokens, k, ctx: Context) -> Selection:
        gen = torch.Generator(device=tokens.device).manual_seed(self.seed)
        scores = torch.rand(tokens.shape[1], generator=gen, device=tokens.device).expand(tokens.shape[0], -1)
        return Selection(topk_indices(scores, k), scores)
