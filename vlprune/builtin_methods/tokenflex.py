"""TokenFLEX (arXiv 2504.03154): one projector for any visual-token count, trained at random counts.

TokenFLEX (Hu et al., Li Auto) makes the token count a free inference knob: the projector pools the
patch grid to ``n x n`` tokens by adaptive average pooling and weights the pooled features with a SwiGLU,
and training draws the count at random, so one model serves every count (the paper reports +1.6 / +1.0 /
+0.4 % at 64 / 144 / 256 tokens over models trained at one fixed count). Here it is a merging method:
each output token is the average of one pooling cell, passed through the learned feature weighting and
then the model's own projector.

No code is released; this reading of the paper departs, by name: the **base model stays frozen** (the
paper also trains the LLM; frozen, the weights are a small module that ``remove()`` takes away again) and
the SwiGLU is a residual block on layer-normed pooled features whose output layer starts at zero, so
untrained it is exactly ``pool``. ``keep = n*n`` pools with ``adaptive_avg_pool2d`` cells, as the paper;
any other ``keep`` uses ``pool``'s near-square cells (an extension: the paper's counts are squares).
Trained by ``vlprune-train tokenflex``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from .. import learned
from ..errors import VlpruneError
from ..registry import register_method
from .base import Method, Selection
from .pool import _cell_weights
from .uniform import cell_centres

PARTS = ("norm.weight", "norm.bias", "gate.weight", "up.weight", "down.weight")


@register_method("tokenflex")
@dataclass
class TokenFLEX(learned.Weighted, Method):
    learned = True  # its block is trained (`vlprune-train tokenflex`) ...
    merges = True  # ... and each output token averages one cell
    summary = "learned: adaptive average pooling to k tokens, then a SwiGLU feature weighting trained at random counts"
    released_code = "none"
    released = "no code released; differs from the paper: the base model stays frozen (only the SwiGLU weighting learns) and it is a residual block that starts as `pool`; non-square `keep` uses `pool`'s cells"
    weights: str | os.PathLike | None = None  # a folder from `vlprune-train tokenflex`; None: shipped for the embedded model

    def __post_init__(self):
        self._check_weights()
        self._params = None

    def _load(self):
        if self._params is None:
            folder, _, tensors = self.loaded()
            missing = [p for p in PARTS if p not in tensors]
            if missing:
                raise VlpruneError(f"weights={str(folder)!r} for method='tokenflex' lack {', '.join(missing)}")
            self._folder, self._params, self._on = folder, tensors, {}

    def bind(self, tensors: dict[str, torch.Tensor]) -> None:
        """Run on ``tensors`` (float32, on the model's device) in place of the folder's, shared, not copied:
        ``vlprune-train tokenflex --model`` trains them through the patched model itself."""
        self._folder, self._params, self._on = "<bound tensors>", tensors, {}

    def select(self, tokens, k, ctx) -> Selection:
        self._load()
        h, w = ctx.grid
        width = self._params["up.weight"].shape[1]
        if tokens.shape[-1] != width:
            raise VlpruneError(f"weights={str(self._folder)!r} for method='tokenflex' weight {width}-wide features; "
                               f"this model's vision features are {tokens.shape[-1]} wide")
        cells = pooling(h, w, k).to(device=tokens.device)
        pooled = torch.einsum("kn,bnd->bkd", cells.to(tokens.dtype), tokens)
        out = self.refine(pooled)
        idx = torch.tensor(centres(h, w, k), device=tokens.device).unsqueeze(0).expand(tokens.shape[0], -1)
        return Selection(idx, tokens=out, sources=cells.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1))

    def refine(self, pooled: torch.Tensor) -> torch.Tensor:
        """The learned weighting of pooled features (..., D), in float32, returned in their dtype."""
        self._load()
        return weigh(pooled.float(), self._device_params(pooled.device)).to(pooled.dtype)

    def _device_params(self, device):
        if device not in self._on:
            self._on[device] = {p: t.float().to(device) for p, t in self._params.items()}
        return self._on[device]



def weigh(pooled: torch.Tensor, params: dict) -> torch.Tensor:
    """The learned feature weighting: ``x + down(silu(gate(LN x)) * up(LN x))`` (float32)."""
    z = F.layer_norm(pooled, pooled.shape[-1:], params["norm.weight"], params["norm.bias"])
    return pooled + F.linear(F.silu(F.linear(z, params["gate.weight"])) * F.linear(z, params["up.weight"]),
                             params["down.weight"])


def _square_side(h: int, w: int, k: int) -> int | None:
    n = math.isqrt(k)
    return n if n * n == k and n <= min(h, w) else None


@lru_cache(maxsize=64)
def pooling(h: int, w: int, k: int) -> torch.Tensor:
    """(k, h*w) averaging matrix: ``adaptive_avg_pool2d`` to n x n cells for k = n*n, else ``pool``'s cells."""
    n = _square_side(h, w, k)
    if n is None:
        return _cell_weights(h, w, k).float()
    eye = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
    return F.adaptive_avg_pool2d(eye, n).view(h * w, k).T.contiguous().float()


@lru_cache(maxsize=64)
def centres(h: int, w: int, k: int) -> tuple[int, ...]:
    """The patch each output token stands for: the centre of its cell."""
    n = _square_side(h, w, k)
    if n is None:
        return cell_centres(h, w, k)
    rows = [((i * h) // n + -(-((i + 1) * h) // n) - 1) // 2 for i in range(n)]
    cols = [((j * w) // n + -(-((j + 1) * w) // n) - 1) // 2 for j in range(n)]
    return tuple(r * w + c for r in rows for c in cols)


def init_tensors(width: int, hidden: int, generator=None) -> dict[str, torch.Tensor]:
    """Fresh weights: identity norm, small gate/up, zero down (so the block starts as plain pooling)."""
    return {"norm.weight": torch.ones(width), "norm.bias": torch.zeros(width),
            "gate.weight": torch.randn(hidden, width, generator=generator) / width ** 0.5,
            "up.weight": torch.randn(hidden, width, generator=generator) / width ** 0.5,
            "down.weight": torch.zeros(width, hidden)}
