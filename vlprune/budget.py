"""How many visual tokens an image keeps.

``ratio`` is the *reduction* ratio (fraction removed, as the papers' "88.9% reduction" = keep 64 of 576);
``keep`` is the number of visual tokens kept per image. Exactly one is given. Nothing is clamped: a
budget that would keep no token is an error, and ``keep >= N`` is the identity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

from .errors import VlpruneError


@dataclass(frozen=True)
class Budget:
    ratio: float | None = None
    keep: int | None = None

    def __post_init__(self):
        if (self.ratio is None) == (self.keep is None):
            raise VlpruneError(
                "give exactly one of ratio= (fraction of visual tokens removed, in [0, 1)) "
                "or keep= (visual tokens kept per image, an int >= 1); "
                f"got ratio={self.ratio!r}, keep={self.keep!r}"
            )
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, Real) or not math.isfinite(self.ratio):
                raise VlpruneError(f"ratio must be a number in [0, 1); got ratio={self.ratio!r}")
            if not 0.0 <= float(self.ratio) < 1.0:
                raise VlpruneError(f"ratio must be in [0, 1) (the fraction of visual tokens removed); got ratio={self.ratio!r}")
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, Integral):
                raise VlpruneError(f"keep must be an int >= 1 (visual tokens kept per image); got keep={self.keep!r}")
            if self.keep < 1:
                raise VlpruneError(f"keep must be >= 1 (visual tokens kept per image); got keep={self.keep!r}")

    def tokens_for(self, n: int) -> int:
        """Tokens kept out of ``n``; ``n`` itself means "no pruning".

        ``ratio`` rounds half up: 0.889 of 576 keeps 64, 0.9 keeps 58, 0.95 keeps 29 (the papers' counts).
        """
        if self.keep is not None:
            return min(int(self.keep), n)
        k = int(math.floor((1.0 - float(self.ratio)) * n + 0.5))
        if k < 1:
            raise VlpruneError(
                f"ratio={self.ratio} keeps no token of an image with {n} visual tokens; "
                f"the largest ratio that keeps one is {1 - 0.5 / n:.6f} (or pass keep=1)"
            )
        return k
