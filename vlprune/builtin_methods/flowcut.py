"""FlowCut (NeurIPS 2025, arXiv 2505.19536): prune inside the vision encoder, following information flow.

After every encoder layer up to the last prune layer (the one before the layer that feeds the
projector), while more than the budget remain, each patch gets a layer score (attention strength A +
semantic relevance S) x information density D, folded into a running score C <- ema*C + (1-ema)*score
(the first layer's score starts it). Every ``every``-th layer counted back from the last prune layer,
patches leave: keep the top C, with a count that shrinks as the [CLS] attention gets flatter
(entropy-adaptive): P = round((N - T) / sqrt(r) * (1 - (H / H_max)^2)), N and T the current and target
patch counts, r the layers left until the last prune, H the entropy of A; the last prune layer drops
straight to the budget, so later layers really run on k tokens.
A = head-mean [CLS] row renormalised over patches; S = head-mean softmax (over all tokens) of
[CLS]-value . values, renormalised over patches; D = L1 norm of the head-mean value vector.

By default this is what the released code selects (``TungChintao/FlowCut`` @ a2ecd24,
``flowcut/modeling_clip_flowcut.py`` ``CLIPEncoderLayer_forward`` and ``flowcut/utils_flowcut.py``):
the running score is updated at every layer, S is unscaled and H_max = log(number of patches).
The paper agrees on the schedule (score every layer, EMA 0.5/0.5, cut every two layers) and defines
H_max as the entropy of uniform attention, which over the patches A covers is the code's log(patches).
Named options for where its pseudocode (Algorithm 1) reads otherwise: ``scale_semantic=True`` divides
S's logits by sqrt(head_dim); ``entropy_max="tokens"`` normalises by log(patches + 1), its log(N) with
N the sequence length counting [CLS] (this package's reading before it was checked against the code).
Deliberate departure: with a batch the released code applies the largest count over its images to all
of them, so an image's result depends on its batch-mates; here every image gets its own count (a batch
equals its single runs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import VlpruneError
from ..registry import register_method
from ..sequence import leading
from .base import Context, Method, Selection, Signal

ENTROPY_MAX = ("patches", "tokens")


@register_method("flowcut")
@dataclass
class FlowCut(Method):
    summary = "progressive in-encoder pruning by information flow (attention x value density, running score)"
    released_code = "`TungChintao/FlowCut` @ a2ecd24"
    released = ("matches the released code for each image; in a batch every image keeps its own count, where the code"
                " applies the batch's largest to all (no option: a batch equals its single runs); "
                "`scale_semantic=True` and `entropy_max=\"tokens\"` follow the paper's pseudocode")
    stage = "in_encoder"
    every: int = 2
    ema: float = 0.5
    scale_semantic: bool = False
    entropy_max: str = "patches"

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise VlpruneError(f"every must be an int >= 1 (prune every n-th layer); got every={self.every!r}")
        if isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)) or not 0.0 <= self.ema < 1.0:
            raise VlpruneError(f"ema must be a number in [0, 1) (weight of the previous running score); got ema={self.ema!r}")
        if not isinstance(self.scale_semantic, bool):
            raise VlpruneError(f"scale_semantic must be True or False; got scale_semantic={self.scale_semantic!r}")
        if self.entropy_max not in ENTROPY_MAX:
            raise VlpruneError(f"entropy_max must be one of {', '.join(map(repr, ENTROPY_MAX))} (log of the patch count, "
                               f"or of patches + [CLS]); got entropy_max={self.entropy_max!r}")

    def encoder_plan(self, feature_layer: int) -> list[int]:
        last = feature_layer - 1
        if last < 0:
            raise VlpruneError("flowcut needs at least one encoder layer before the feature layer")
        return list(range(last + 1))  # the running score is updated after every layer up to the last prune

    def encoder_signals(self, layer: int) -> list[Signal]:
        return [Signal("cls_attention", layer), Signal("values", layer), Signal("cls_value", layer)]

    def layer_score(self, layer: int, signals: dict, valid) -> tuple[torch.Tensor, torch.Tensor]:
        """(score (B, t), renormalised [CLS] attention (B, t)) of one layer; ``valid`` (B, t) or None marks
        the real tokens of a padded batch (padding gets zero attention and semantic weight)."""
        attn = signals[Signal("cls_attention", layer)].mean(1)
        if valid is not None:
            attn = attn * valid
        attn = attn / attn.sum(-1, keepdim=True)
        values, cls_value = signals[Signal("values", layer)], signals[Signal("cls_value", layer)]
        logits = torch.cat([(cls_value * cls_value).sum(-1, keepdim=True),
                            torch.einsum("bhd,bhtd->bht", cls_value, values)], dim=-1)
        if self.scale_semantic:
            logits = logits / math.sqrt(values.shape[-1])
        if valid is not None:
            logits = logits.masked_fill(~F.pad(valid, (1, 0), value=True)[:, None], float("-inf"))
        sem = torch.softmax(logits, dim=-1)[..., 1:].mean(1)
        sem = sem / sem.sum(-1, keepdim=True)
        density = values.mean(1).abs().sum(-1)
        return (attn + sem) * density, attn

    def prune_counts(self, attn: torch.Tensor, counts: list[int], remaining: int, targets: list[int]) -> list[int]:
        """Patches each image drops now: the entropy-adaptive P, per image (``counts`` real tokens each)."""
        n = torch.tensor(counts if self.entropy_max == "patches" else [c + 1 for c in counts],
                         dtype=torch.float32, device=attn.device)
        entropy = -(attn * attn.clamp_min(1e-30).log()).sum(-1)
        scale = torch.tensor([(c - t) / math.sqrt(remaining) for c, t in zip(counts, targets)], device=attn.device)
        drops = (scale * (1.0 - (entropy / n.log()) ** 2)).round()
        drops = drops.tolist()  # host sync: the counts decide the shape of every later layer
        if not all(math.isfinite(d) for d in drops):
            raise VlpruneError("flowcut got a non-finite [CLS] attention (NaN or inf in the image or the tower); "
                               "check pixel_values")
        return [int(d) for d in drops]

    def encoder_step(self, layer, remaining, signals, state, target, counts=None):
        b, _, t = signals[Signal("cls_attention", layer)].shape
        device = signals[Signal("cls_attention", layer)].device
        counts = [t] * b if counts is None else counts
        targets = [target] * b if isinstance(target, int) else list(target)  # one per row: NeXT's view quotas
        if all(c <= q for c, q in zip(counts, targets)):  # at the budget: the released code stops scoring too
            return None, state, counts
        valid = leading(counts, t, device) if min(counts) < t else None
        score, attn = self.layer_score(layer, signals, valid)
        cum = score if state is None else self.ema * state + (1.0 - self.ema) * score
        if remaining % self.every:
            return None, cum, counts
        if remaining == 0:
            new = targets
        else:
            drops = self.prune_counts(attn, counts, remaining, targets)
            new = [c if c <= q else max(c - d, q) for c, d, q in zip(counts, drops, targets)]
        width = max(new)
        ranked = cum if valid is None else cum.masked_fill(~valid, float("-inf"))
        top = ranked.topk(width, dim=-1).indices  # best first
        if min(new) < width:  # shorter rows: their real tokens first, then padding (masked downstream)
            keep = top.gather(1, torch.where(leading(new, width, device), top, top + t).argsort(dim=-1))
        else:
            keep = top.sort(dim=-1).values
        return keep, cum.gather(1, keep), new

    def select(self, tokens, k, ctx: Context) -> Selection:  # pragma: no cover - never called for in_encoder
        raise VlpruneError("flowcut prunes inside the vision encoder; its patcher drives encoder_step")
