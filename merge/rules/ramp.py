"""The time ramp S(p) of K-LoRA / EST-LoRA over denoising progress p = n / N, and where it crosses a level."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Ramp:
    """S(p) = α·p + β, or (α·p + β) mod α when `wrap` (K-LoRA's `s*` pattern)."""

    alpha: float
    beta: float
    wrap: bool = False

    def __call__(self, p: float) -> float:
        value = self.alpha * p + self.beta
        return value % self.alpha if self.wrap else value

    def pieces(self) -> list[tuple[float, float, float]]:
        """Linear pieces (start, end, offset) on [0, 1) with S(p) = α·p + offset on each."""
        if not self.wrap:
            return [(0.0, 1.0, self.beta)]
        pieces, start = [], 0.0
        k = math.floor(self.beta / self.alpha)
        while start < 1.0:
            end = min(1.0, ((k + 1) * self.alpha - self.beta) / self.alpha)
            if end > start:
                pieces.append((start, end, self.beta - k * self.alpha))
            start, k = max(start, end), k + 1
        return pieces

    def below(self, level: float) -> list[tuple[float, float]]:
        """Intervals of p in [0, 1) where S(p) < level (strict), in closed form."""
        intervals = []
        for start, end, offset in self.pieces():
            cut = end if level == math.inf else (level - offset) / self.alpha
            if cut > start:
                intervals.append((start, min(cut, end)))
        return intervals
