"""FastV (ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2"): prune inside the LLM.

At decoder layer K (default 2) the image tokens that the prompt's last token attended to least at
layer K-1 (head mean of its softmax row) are dropped; layers K and later, and their KV cache, run on
the survivors, which keep their original position ids. Layers before K still see every token, so
the saving is smaller than pre-LLM pruning at the same budget. The paper's R is our ``ratio``.
The attention row is computed from q/k of layer K-1 (one query), so the LM keeps SDPA.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_method
from ..select import topk_indices
from .base import Context, Method, Selection, Signal


@register_method("fastv")
@dataclass
class FastV(Method):
    summary = "inside the LLM: at decoder layer K keep the image tokens the last token attends to most"
    released_code = "`pkunlp-icler/FastV` @ d165972"
    released = "matches the released code"
    stage = "llm"
    layer: int = 2

    def signals(self):
        return [Signal("last_attention", self.layer - 1)]

    def llm_layer(self, depth: int) -> int:
        return self.layer

    def select(self, tokens, k, ctx: Context) -> Selection:
        scores = ctx.signals[Signal("last_attention", self.layer - 1)].mean(1)
        return Selection(topk_indices(scores, k), scores)
