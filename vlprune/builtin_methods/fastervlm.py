"""FasterVLM (arXiv 2412.01818 v1): keep the patches the [CLS] token attends to most.

Score = [CLS] -> patch attention of encoder layer ``layer`` (default -2, the layer whose output LLaVA
feeds on), mean over heads, raw softmax probabilities; plain top-k, raster order; pure drop.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_method
from ..select import topk_indices
from .base import Context, Method, Selection, Signal


@register_method("fastervlm")
@dataclass
class FasterVLM(Method):
    summary = "[CLS] attention of the penultimate encoder layer, head mean, top-k"
    released_code = "`Theia-4869/FasterVLM` @ f5d5f12"
    released = "matches the released code"
    layer: int = -2

    def signals(self):
        return [Signal("cls_attention", self.layer)]

    def select(self, tokens, k, ctx: Context) -> Selection:
        scores = ctx.signals[Signal("cls_attention", self.layer)].mean(dim=1)
        return Selection(topk_indices(scores, k), scores)
