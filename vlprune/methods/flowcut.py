"""FlowCut (NeurIPS 2025, arXiv 2505.19536): prune inside the vision encoder, following information flow.

Every ``every`` layers up to the layer that feeds the projector, each patch gets a layer score
(attention strength A + semantic relevance S) x information density D, accumulated across layers
with an EMA, and the count to drop shrinks as the [CLS] attention gets flatter (entropy-adaptive):
P = round((n - T) / sqrt(r) * (1 - (H / log n)^2)), r = layers until the last prune, n and T counted
with [CLS]. The last prune layer drops straight to the budget, so later layers really run on k tokens.
A = head-mean [CLS] row renormalised over patches; S = head-mean softmax of [CLS]-value . values,
renormalised over patches; D = L1 norm of the head-mean value vector. Deviation: S is scaled by
1/sqrt(head_dim) as in the paper's pseudocode; ``scale_semantic=False`` reproduces the released code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import VlpruneError
from ..registry import register_method
from ..select import topk_indices
from .base import Context, Method, Selection, Signal


@register_method("flowcut")
@dataclass
class FlowCut(Method):
    summary = "progressive in-encoder pruning by information flow (attention x value density, EMA)"
    stage = "in_encoder"
    every: int = 2
    ema: float = 0.5
    scale_semantic: bool = True

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 1:
            raise VlpruneError(f"every must be an int >= 1 (prune every n-th layer); got every={self.every!r}")
        if not 0.0 <= self.ema < 1.0:
            raise VlpruneError(f"ema must be in [0, 1) (weight of the previous cumulative score); got ema={self.ema!r}")

    def encoder_plan(self, feature_layer: int) -> list[int]:
        last = feature_layer - 1
        if last < 0:
            raise VlpruneError("flowcut needs at least one encoder layer before the feature layer")
        return sorted(range(last, -1, -self.every))

    def encoder_signals(self, layer: int) -> list[Signal]:
        return [Signal("cls_attention", layer), Signal("values", layer), Signal("cls_value", layer)]

    def layer_score(self, layer: int, signals: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(score (B, t), renormalised [CLS] attention (B, t)) of one layer."""
        attn = signals[Signal("cls_attention", layer)].mean(1)
        attn = attn / attn.sum(-1, keepdim=True)
        values, cls_value = signals[Signal("values", layer)], signals[Signal("cls_value", layer)]
        logits = torch.cat([(cls_value * cls_value).sum(-1, keepdim=True),
                            torch.einsum("bhd,bhtd->bht", cls_value, values)], dim=-1)
        if self.scale_semantic:
            logits = logits / math.sqrt(values.shape[-1])
        sem = torch.softmax(logits, dim=-1)[..., 1:].mean(1)
        sem = sem / sem.sum(-1, keepdim=True)
        density = values.mean(1).abs().sum(-1)
        return (attn + sem) * density, attn

    def encoder_step(self, layer, remaining, signals, state, target):
        score, attn = self.layer_score(layer, signals)
        cum = score if state is None else self.ema * state + (1.0 - self.ema) * score
        n, t = attn.shape[1] + 1, target + 1  # counts include [CLS], as the paper's formula does
        if remaining == 0:
            new = t
        else:
            if attn.shape[0] != 1:
                raise RuntimeError("flowcut's adaptive counts are per image: the patcher must run one image at a time")
            entropy = -(attn * attn.clamp_min(1e-30).log()).sum(-1)[0]
            drop = round(float((n - t) / math.sqrt(remaining) * (1.0 - (entropy / math.log(n)) ** 2)))
            new = max(n - drop, t)
        keep = topk_indices(cum, new - 1)
        return keep, cum.gather(1, keep)

    def select(self, tokens, k, ctx: Context) -> Selection:  # pragma: no cover - never called for in_encoder
        raise VlpruneError("flowcut prunes inside the vision encoder; its patcher drives encoder_step")
