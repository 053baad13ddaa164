"""DAMRO (EMNLP 2024, arXiv 2410.04514): contrastive decoding against the [CLS]-attention outlier tokens.

DAMRO observes that the few patch tokens the vision encoder's [CLS] attends to most are mostly
high-norm background "outliers", that the LLM's attention follows them, and that this drives object
hallucination. So, while decoding, it contrasts the model with a copy of itself that sees *only* those
outliers: with ``full`` the next-token logits of the model seeing the image and ``outlier`` those of
the model seeing only the top-``outliers`` [CLS]-attention tokens of the same image (same text),

    combined = (1 + alpha) * full - alpha * outlier,
    combined[v] = -inf  where  p_full(v) < beta * max_v' p_full(v')   (adaptive plausibility cut-off)

and the next token is chosen from ``combined`` (greedy or sampled, with the usual generate options).
The cut-off keeps the contrast from promoting tokens the full model finds implausible. Since the two
softmaxes share one normaliser, ``p < beta * max p`` is ``logit < max logit + log(beta)``.

Why a *method* with ``prunes = False`` rather than a pruning method: DAMRO removes nothing the LM
sees; it changes how tokens are generated. ``vlprune.patch(model, "damro")`` keeps every visual token
(it takes no ratio/keep) and contrasts during ``generate()``; ``forward()`` is the plain model's.
``prune=`` composes it with a pruning method: ``vlprune.patch(model, "damro", prune="fastervlm",
ratio=0.75)`` prunes as ``fastervlm`` does (``ratio``/``keep`` are its budget, ``prune_options`` its
options) and picks the outliers among the tokens that survive, so the contrast runs on what the pruned
model sees. Methods of stage ``llm`` (fastv, visual_exit) cannot be composed: they drop tokens inside
the LM's batch, which the contrastive batch (full rows + outlier rows) would break; that is rejected.

Options (defaults: the reference code's LLaVA-1.5 settings, its run scripts' and argument defaults):
``outliers`` = 10 tokens per image (the paper's k; its POPE/CHAIR scripts for InstructBLIP use 4),
``alpha`` = 2.0 (contrast strength; 0 turns the contrast off - generation is then the plain or pruned
model's, bit for bit, as ratio 0 is the identity for pruning methods), ``beta`` = 0.1 (cut-off),
``layer`` = -2 (the encoder layer whose [CLS] attention row ranks the outliers: the layer LLaVA feeds
on, as in the reference), ``scoring`` = "joint" (as the reference: the [CLS] row of one attention over
the concatenated heads, full-width q . k scaled by 1/sqrt(hidden size); "head_mean" ranks by the
per-head softmax rows averaged over heads, as FasterVLM reads them - on sharpened test towers the two
share only 30-70 % of their outliers).

Where we deviate from the reference code (neither changes the outlier set or the formula):
- the outlier tokens reach the LM in raster order (the project's convention), not in descending
  score order;
- the combined logits go through generate's logits processors (temperature, top-p, repetition
  penalty, ...) like any logits; the reference samples from them directly and ignores those options.

How the two passes run (see ``patches/_contrast.py``): the outlier rows are a second, short prompt
(text + ``outliers`` tokens per image). At prefill it runs once beside the full prompt; its KV cache
is then appended to the full rows' cache (left-padded, masked), so every decoding step is *one* LM
call on the batch [full rows; outlier rows] - one extra short sequence, not a second model call per
token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import VlpruneError
from ..registry import get_method, register_method
from .base import Context, Method, Selection, Signal


SCORING = {"joint": "cls_attention_joint", "head_mean": "cls_attention"}  # option -> the signal it reads


@register_method("damro")
@dataclass
class DAMRO(Method):
    summary = ("contrastive decoding against the model seeing only the [CLS]-attention outlier tokens "
               "(object hallucination); prunes nothing unless prune= names a method")
    released_code = "`coder-gx/DAMRO` @ 03008ac"
    released = ("the outliers and the contrast step match (`scoring=\"head_mean\"` ranks by the head mean instead); "
                "differs: outliers reach the LM in raster order, generate's logits processors apply to the combined "
                "logits")
    stage = "decoding"
    budgeted = False
    prunes = False
    outliers: int = 10
    alpha: float = 2.0
    beta: float = 0.1
    layer: int = -2
    scoring: str = "joint"
    prune: str | None = None
    prune_options: dict | None = None

    def __post_init__(self):
        if isinstance(self.outliers, bool) or not isinstance(self.outliers, int) or self.outliers < 1:
            raise VlpruneError(f"outliers must be an int >= 1 (outlier tokens per image); got outliers={self.outliers!r}")
        if not _real(self.alpha) or self.alpha < 0:
            raise VlpruneError(f"alpha must be a number >= 0 (contrast strength; 0 turns it off); got alpha={self.alpha!r}")
        if not _real(self.beta) or not 0 <= self.beta <= 1:
            raise VlpruneError(f"beta must be in [0, 1] (plausibility cut-off, a share of the top probability); "
                               f"got beta={self.beta!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise VlpruneError(f"layer must be an int (vision encoder layer, negative counts from the end); got layer={self.layer!r}")
        if self.scoring not in SCORING:
            raise VlpruneError(f"scoring must be one of {', '.join(map(repr, SCORING))} (the [CLS] row over the heads "
                               f"taken as one, or their mean); got scoring={self.scoring!r}")
        if self.prune_options is not None and not isinstance(self.prune_options, dict):
            raise VlpruneError(f"prune_options must be a dict of the prune method's options; got prune_options={self.prune_options!r}")
        if self.prune is None:
            if self.prune_options:
                raise VlpruneError("prune_options needs prune= (the pruning method they are options of)")
            return
        cls = get_method(self.prune)  # an unknown name raises with the registered names
        if not getattr(cls, "prunes", True):
            raise VlpruneError(f"prune={self.prune!r} is not a pruning method; allowed: a pruning method of stage "
                               "encoder, projector or in_encoder")
        if cls.stage == "llm":
            raise VlpruneError(f"prune={self.prune!r} prunes inside the LM (stage 'llm'), which the contrastive "
                               "batch of full and outlier rows cannot share; allowed: a pruning method of stage "
                               "encoder, projector or in_encoder (e.g. prune='fastervlm')")
        cls.create(**(self.prune_options or {}))  # its options are checked now, not at the first call

    # -- what the patcher asks -------------------------------------------------------------------
    def pruner(self) -> Method:
        """The pruning method the patcher runs: ``prune``'s, or :class:`KeepAll` (every token stays)."""
        if self.prune is None:
            return KeepAll()
        return get_method(self.prune).create(**(self.prune_options or {}))

    @property
    def active(self) -> bool:
        """alpha = 0 is the identity: no outlier pass at all."""
        return self.alpha > 0

    def signals(self) -> list[Signal]:
        return [Signal(SCORING[self.scoring], self.layer)]

    def choose(self, scores: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """The outlier tokens of one image: the top-``outliers`` of ``scores`` (N,) - its [CLS] row, as
        ``scoring`` reads it - among ``allowed`` (ascending indices of the tokens the LM sees; None: all), ascending."""
        if allowed is not None:
            scores = torch.full_like(scores, float("-inf")).index_copy(0, allowed, scores[allowed])
            k = min(self.outliers, len(allowed))
        else:
            k = min(self.outliers, scores.shape[0])
        return scores.topk(k).indices.sort().values

    def combine(self, full: torch.Tensor, outlier: torch.Tensor) -> torch.Tensor:
        """The contrasted next-token logits (float32) from the full and the outlier-only logits (..., V)."""
        full, outlier = full.float(), outlier.float()
        combined = (1 + self.alpha) * full - self.alpha * outlier
        if self.beta > 0:
            cutoff = full.max(dim=-1, keepdim=True).values + math.log(self.beta)
            combined = combined.masked_fill(full < cutoff, float("-inf"))
        return combined

    def select(self, tokens, k, ctx: Context) -> Selection:  # pragma: no cover - not a pruning method
        raise VlpruneError("damro prunes nothing itself; its patcher runs the prune= method (or keeps every token)")


@dataclass
class KeepAll(Method):
    """The pruning side of ``damro`` without ``prune=``: every visual token reaches the LM (the handle's
    budget is the identity, so the patcher runs the unpruned computation). Not registered."""

    name = "damro"
    stage = "encoder"

    def select(self, tokens, k, ctx: Context) -> Selection:
        idx = torch.arange(tokens.shape[1], device=tokens.device)[:k]
        return Selection(idx.expand(tokens.shape[0], -1))


def _real(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)

