"""DyVTE (NeurIPS 2025, arXiv 2411.19628): a learned gate decides per prompt where image tokens leave the LLM.

DyVTE (Wu et al.) finds that visual tokens stop mattering once the text
tokens have absorbed the image, and when that happens depends on the image and the question. Before each
decoder layer a small gate (no bias: linear 2D -> H, GELU, linear H -> 2) reads the layer's input at the
prompt's text tokens - their mean after the image and the last token, concatenated - and votes "keep" or
"exit"; at the first layer that votes exit, all image tokens are dropped for the rest of the LM (and its
KV cache). As in the released code the gate is trained with the base model frozen, on labels that say
whether exiting at a layer leaves the answer unchanged (``vlprune-train dyvte``).

Departures, named: ``threshold`` is the exit probability a vote needs (default 0.5: the released
argmax of the two logits); ``layer`` (default 1) is the earliest layer tokens may leave before (the
released code may exit after layer 0, which is the same). In a batch, the tokens leave at the first layer
where every row votes exit, so a row may keep its image longer than it would alone; the released code
runs one prompt at a time. Text tokens that sit between the image and the question's last token are
averaged; a prompt with none gets a zero mean.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import learned
from ..errors import VlpruneError
from ..registry import register_method
from .base import Method, Selection


@register_method("dyvte")
@dataclass
class DyVTE(learned.Weighted, Method):
    summary = "inside the LLM: a learned gate on the text tokens decides at which layer all image tokens leave"
    released_code = "`DoubtedSteam/DyVTE` @ b4a3396"
    released = "the gate, its input and its training labels as released; differs: in a batch the tokens leave where every row votes exit (the code runs one prompt at a time; no option); `threshold` and the earliest `layer` are options whose defaults are the code's"
    stage = "llm"
    budgeted = False
    learned = True
    weights: str | os.PathLike | None = None  # a folder from `vlprune-train dyvte`; None: shipped for the embedded model
    threshold: float = 0.5
    layer: int | None = None

    def __post_init__(self):
        self._check_weights()
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 <= self.threshold < 1.0:
            raise VlpruneError(f"threshold must be a number in [0, 1) (the exit probability a row's vote needs; "
                               f"0: always exit at the earliest layer); got threshold={self.threshold!r}")
        self._gates = None

    def _load(self):
        if self._gates is None:
            gates = {}
            for name, t in self.loaded()[2].items():
                layer, part = name.split(".")[1:]
                gates.setdefault(int(layer), {})[part] = t.float()
            self._gates, self._on = gates, {}

    def llm_layer(self, depth: int) -> int:
        return 1 if self.layer is None else self.layer

    def exit_votes(self, layer, text_mean, last):
        self._load()
        gate = self._gates.get(layer)
        if gate is None:  # weights with no gate before this layer: that layer never exits
            return torch.zeros(last.shape[0], dtype=torch.bool, device=last.device)
        w1, w2 = self._weights(layer, last.device)
        logits = F.linear(F.gelu(F.linear(torch.cat([text_mean, last], -1), w1)), w2)
        return torch.softmax(logits, -1)[:, 1] > self.threshold

    def _weights(self, layer, device):
        """The gate's weights on ``device`` (copied there once)."""
        key = (layer, device)
        if key not in self._on:
            self._on[key] = tuple(self._gates[layer][p].to(device) for p in ("w1", "w2"))
        return self._on[key]

    def select(self, tokens, k, ctx) -> Selection:  # pragma: no cover - the exit keeps nothing
        raise VlpruneError("dyvte keeps no image token once they exit; its patcher drops them all")


def text_state(hidden, image, anchor, valid=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's input from a decoder layer's input ``hidden`` (B, L', D), L' >= L: (the mean over the text
    tokens after the last image token and before the prompt's last, the last token itself), both (B, D)
    float32. ``image`` (B, L) marks image tokens, ``anchor`` (B,) is each prompt's last token, ``valid``
    (B, L) its non-padding positions. The patcher (inference) and the trainer (labels) both call this."""
    pos = torch.arange(image.shape[1], device=image.device)
    after = torch.where(image, pos, -1).amax(1)  # each row's last image position
    text = (pos > after.unsqueeze(1)) & (pos < anchor.unsqueeze(1)) & ~image
    if valid is not None:
        text &= valid
    h = hidden[:, : image.shape[1]].float()
    mean = (h * text.unsqueeze(-1)).sum(1) / text.sum(1, keepdim=True).clamp(min=1)
    return mean, h[torch.arange(h.shape[0], device=h.device), anchor]


def gate_tensors(width: int, hidden: int, layers, generator=None) -> dict[str, torch.Tensor]:
    """Freshly initialised gates (the released Linear initialisation scale) for ``layers``, 2*width -> hidden -> 2."""
    out = {}
    for layer in layers:
        out[f"gates.{layer}.w1"] = (torch.rand(hidden, 2 * width, generator=generator) * 2 - 1) / (2 * width) ** 0.5
        out[f"gates.{layer}.w2"] = (torch.rand(2, hidden, generator=generator) * 2 - 1) / hidden ** 0.5
    return out
