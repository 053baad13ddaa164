"""VTC-CLS (arXiv 2412.05819): rank patches by [CLS] attention accumulated over several late layers.

One layer's [CLS] row is a noisy vote; adding the head-mean rows of a few consecutive layers that end
at the layer whose output the projector receives gives a steadier ranking. Top-k of the sum, raster
order, pure drop. Default layers: ``start_layer=-4`` .. ``end_layer=-2`` (inclusive), i.e. layers
20, 21, 22 of CLIP ViT-L's 24 -- the three layers ending at the penultimate one, the paper's reported
best K = 3 (the repo's argparse default is layer 16, seven layers; the paper table's K is not recoverable).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import VlpruneError
from ..registry import register_method
from ..select import topk_indices
from .base import Context, Method, Selection, Signal


@register_method("vtc_cls")
@dataclass
class VTCCLS(Method):
    summary = "[CLS] attention summed over the last encoder layers up to the penultimate, top-k"
    released_code = "`THU-MIG/VTC-CLS` @ e41ac9b"
    released = ("matches the released code; the default layers are the paper's K = 3 ending at the penultimate layer "
                "(the code's argparse default, 7 layers, is `start_layer=-8`)")
    stage = "encoder"
    start_layer: int = -4
    end_layer: int = -2

    def __post_init__(self):
        for name in ("start_layer", "end_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise VlpruneError(
                    f"{name} must be an int encoder layer index (negative counts from the end), got {value!r}")
        if (self.start_layer < 0) != (self.end_layer < 0):
            raise VlpruneError(
                f"start_layer={self.start_layer} and end_layer={self.end_layer} must be both negative (counted "
                "from the end) or both non-negative, so that their order can be checked without the encoder depth"
            )
        if self.start_layer > self.end_layer:
            raise VlpruneError(
                f"start_layer={self.start_layer} must be <= end_layer={self.end_layer} (the layer range is inclusive)"
            )

    def layers(self) -> list[int]:
        return list(range(self.start_layer, self.end_layer + 1))

    def signals(self):
        return [Signal("cls_attention", layer) for layer in self.layers()]

    def select(self, tokens, k, ctx: Context) -> Selection:
        scores = None
        for layer in self.layers():
            row = ctx.signals[Signal("cls_attention", layer)].mean(dim=1)
            scores = row if scores is None else scores + row
        return Selection(topk_indices(scores, k), scores)
