"""Visual-token exit: every image token leaves the LLM at one decoder layer (training-free DyVTE).

DyVTE (arXiv 2411.19628, NeurIPS 2025) observes that once the text tokens have absorbed the image,
the visual tokens stop contributing, so all of them can be removed after some layer; it learns when
with a small hyper-network. This training-free form exits at a fixed layer (default: the LM's middle
layer - for a 32-layer LM, removing ~580 of ~650 tokens from half the layers saves ~44% of its
compute, the order of the paper's 45.7% on LLaVA-1.5), or, with ``threshold``, at the first layer
>= ``layer`` where the prompt's last token puts less than ``threshold`` of its attention (head mean,
previous layer) on the image. Not budgeted: it takes no ratio/keep. In a batch, the threshold exit
happens when every row qualifies, so a batch may exit later than its rows would alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import VlpruneError
from ..registry import register_method
from .base import Context, Method, Selection


@register_method("visual_exit")
@dataclass
class VisualExit(Method):
    summary = "inside the LLM: all image tokens leave at one decoder layer (fixed, or by attention mass)"
    released_code = "none"
    released = "ours: the training-free form of DyVTE's learned exit"
    stage = "llm"
    budgeted = False
    layer: int | None = None
    threshold: float | None = None

    def __post_init__(self):
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise VlpruneError(f"threshold must be in (0, 1) (a share of attention) or None; got threshold={self.threshold!r}")

    def llm_layer(self, depth: int) -> int:
        return depth // 2 if self.layer is None else self.layer

    def exit_threshold(self) -> float | None:
        return self.threshold

    def select(self, tokens, k, ctx: Context) -> Selection:  # pragma: no cover - the exit keeps nothing
        raise VlpruneError("visual_exit keeps no image token; its patcher drops them all")
