"""ATP-LLaVA (CVPR 2025, arXiv 2412.00447): learned, per-instance thresholds prune image tokens at several LM layers.

ATP-LLaVA (Ye et al.) observes that how many image tokens a prompt can lose differs by layer and by
image-question pair. Before each of a few decoder layers an Adaptive Token Pruning module reads the
previous layer's attention: a token's *redundancy score* is the mean of the attention it receives from
the image's tokens (self-modality) and from the question's tokens (cross-modality); its *spatial score*
says how sparse a uniform grid it lies on (Spatial Augmented Pruning: a few evenly spread tokens keep the
layout). A small network predicts two thresholds for this instance, and a token stays when either score
clears its threshold - so every prompt keeps its own count at every module. Training uses soft masks
(sigmoid of score minus threshold, times a temperature) in the attention of later layers and a budget
term on the tokens kept (``vlprune-train atp``); inference drops the rest from the sequence and KV cache.

No code was released; this follows the paper. Our choices where it leaves room or where we depart, named:
the scores are divided by their mean over the image's remaining tokens (raw attention shares are ~1/N,
too close together for one temperature); the threshold network reads 16 quantiles of each normalised
score, so one set of weights serves any token count (NeXT's tiles, any resolution), and gives
``softplus`` (redundancy) and ``sigmoid`` (spatial) thresholds; the spatial score of a token is
``1 - lam * rate`` of the sparsest power-of-two-stride grid (from the grid's first token) that holds it;
the base model stays frozen (the paper fine-tunes the LLM with the modules); the budget term is one
target for the mean share of image tokens per decoder layer. ``scale`` (default 1: as trained) multiplies
the redundancy threshold, to trade accuracy for tokens without retraining.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import learned
from ..errors import VlpruneError
from ..registry import register_method
from .base import Context, Method, Signal

QUANTILES = 16
#: where the modules go by default, as fractions of the LM's depth (before layers 4, 14 and 24 of 32)
PLACES = (4 / 32, 14 / 32, 24 / 32)


def default_layers(depth: int) -> list[int]:
    """Module layers for an LM ``depth`` layers deep: ``PLACES`` rounded, at least 1, distinct."""
    return sorted({min(depth - 1, max(1, round(depth * f))) for f in PLACES})


def spatial_scores(grid: tuple[int, int], lam: float, device=None) -> torch.Tensor:
    """(N,) ``1 - lam * rate`` of the sparsest grid of stride 2^s (rate 1 / 4^s) that holds each token."""
    rows, cols = grid
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    stride = torch.ones(rows * cols, device=device)
    s = 2
    while s < 2 * max(rows, cols):
        stride = torch.where((r % s == 0) & (c % s == 0), float(s), stride)
        s *= 2
    return 1 - lam / stride ** 2


def normalised(score: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """(I, N) scores divided by their mean over the alive tokens (0 where not alive)."""
    score = score * alive
    mean = score.sum(1, keepdim=True) / alive.sum(1, keepdim=True).clamp(min=1)
    return score / mean.clamp(min=1e-12)


def quantile_features(scores: list[torch.Tensor], alive: torch.Tensor) -> torch.Tensor:
    """(I, QUANTILES * len(scores)): evenly spaced quantiles of each (I, N) score over the alive tokens
    (zeros for an image with none)."""
    n, total = alive.sum(1), alive.shape[1]
    at = torch.linspace(0, 1, QUANTILES, device=alive.device)
    pos = (total - n).unsqueeze(1) + (at * (n - 1).clamp(min=0).unsqueeze(1)).round().long()  # alive sort last
    out = []
    for s in scores:
        ranked = s.masked_fill(~alive, float("-inf")).sort(1).values  # the dead first
        out.append(ranked.gather(1, pos.clamp(max=total - 1)).masked_fill((n == 0).unsqueeze(1), 0.0))
    return torch.cat(out, 1)


def redundancy(image_att: torch.Tensor, text_att: torch.Tensor, alive: torch.Tensor):
    """(redundancy score (I, N), threshold network input (I, 2 * QUANTILES)) from the head means of the
    attention each token receives from its image (``image_att``) and the question (``text_att``)."""
    own, cross = normalised(image_att, alive), normalised(text_att, alive)
    return (own + cross) / 2, quantile_features([own, cross], alive)


def thresholds(features: torch.Tensor, module: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(redundancy threshold, spatial threshold), each (I, 1), of one module for its input features."""
    z = F.linear(F.relu(F.linear(features, module["w1"], module["b1"])), module["w2"], module["b2"])
    return F.softplus(z[:, :1]), torch.sigmoid(z[:, 1:])


def init_tensors(layers, hidden: int = 64, generator=None) -> dict[str, torch.Tensor]:
    """Fresh modules before ``layers``: thresholds start near (1, 0.5): tokens above the mean redundancy
    and one token in 16 on the grid stay."""
    out, width = {}, 2 * QUANTILES
    for layer in layers:
        out[f"modules.{layer}.w1"] = (torch.rand(hidden, width, generator=generator) * 2 - 1) / width ** 0.5
        out[f"modules.{layer}.b1"] = torch.zeros(hidden)
        out[f"modules.{layer}.w2"] = (torch.rand(2, hidden, generator=generator) * 2 - 1) * 0.01 / hidden ** 0.5
        out[f"modules.{layer}.b2"] = torch.tensor([0.5413, 0.0])  # softplus(0.5413) = 1, sigmoid(0) = 0.5
    return out


def modules(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """``modules.{layer}.{part}`` tensors grouped by layer."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        _, layer, part = name.split(".")
        out.setdefault(int(layer), {})[part] = t
    return out


@register_method("atp")
@dataclass
class ATP(learned.Weighted, Method):
    summary = "inside the LLM: learned per-prompt thresholds on attention-received and grid scores prune at several layers"
    released = "no code released; follows the paper: scores, thresholds and spatial grids as described, with the choices named in the docstring (normalised scores, quantile input, frozen base)"
    stage = "llm"
    budgeted = False
    learned = True
    weights: str | os.PathLike | None = None  # a folder from `vlprune-train atp`; None: shipped for the embedded model
    scale: float = 1.0

    def __post_init__(self):
        self._check_weights()
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not self.scale >= 0:
            raise VlpruneError(f"scale must be a number >= 0 (multiplies the learned redundancy threshold; "
                               f"1: as trained); got scale={self.scale!r}")
        self._on = {}

    def signals(self) -> list[Signal]:
        """Both kinds at the layer before each drop of the plan (-1 here: the plan comes with the weights)."""
        return [Signal("image_attention", -1), Signal("text_attention", -1)]

    def _config(self):
        _, config, tensors = self.loaded()
        return config, modules(tensors)

    def llm_plan(self, depth: int) -> list[int]:
        return sorted(self._config()[1])

    def llm_layer(self, depth: int) -> int:
        return self.llm_plan(depth)[0]

    def _module(self, layer, device):
        if (layer, device) not in self._on:
            self._on[(layer, device)] = {k: v.float().to(device) for k, v in self._config()[1][layer].items()}
        return self._on[(layer, device)]

    def llm_keep(self, layer: int, tokens: torch.Tensor, ctx: Context):
        config = self._config()[0]
        image = ctx.signals[Signal("image_attention", layer - 1)].mean(1)
        text = ctx.signals[Signal("text_attention", layer - 1)].mean(1)
        score, features = redundancy(image, text, ctx.alive)
        theta_r, theta_s = thresholds(features, self._module(layer, score.device))
        spatial = spatial_scores(ctx.grid, config["lam"], score.device)
        keep = ((score > theta_r * self.scale) | (spatial > theta_s)) & ctx.alive
        return keep, score
