"""The switch shared by K-LoRA and EST-LoRA: subject iff score_c / γ > score_s · S(p), else style.

A rule of this family is fully described by per-module scores, one γ and a ramp; its decision depends only on
weights and progress, so each layer's schedule follows in closed form (see `phases`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..lora import STYLE, SUBJECT
from .ramp import Ramp


def trimmed_mean_gamma(ratios: list[float]) -> float:
    """γ as the public K-LoRA code defines it: mean of the ratios after dropping those ≥ 3× their mean."""
    finite = [r for r in ratios if math.isfinite(r)]
    if not finite:
        return 1.0
    mu = sum(finite) / len(finite)
    kept = [r for r in finite if r < 3 * mu] or finite
    gamma = sum(kept) / len(kept)
    return gamma if gamma > 0 else 1.0


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


@dataclass(frozen=True)
class SwitchRule:
    """Scores per module (subject, style), the balance γ and the ramp S(p)."""

    scores: dict[str, tuple[float, float]]
    gamma: float
    ramp: Ramp

    def choose(self, module: str, p: float) -> str:
        """The online decision at progress p, exactly as the formula reads (ties go to style)."""
        score_c, score_s = self.scores[module]
        return SUBJECT if score_c / self.gamma > score_s * self.ramp(p) else STYLE

    def balanced(self, beta: float, gamma: float) -> SwitchRule:
        """The same scores with ramp offset β and balance γ (the two knobs that trade subject for style)."""
        return replace(self, gamma=gamma, ramp=replace(self.ramp, beta=beta))

    def phases(self, module: str) -> list[tuple[float, str]]:
        """Closed form of `choose` over p in [0, 1): (start, source) pairs, merged where the source repeats."""
        score_c, score_s = self.scores[module]
        level = ratio(score_c / self.gamma, score_s) if score_c > 0 else -math.inf
        edges = [(0.0, STYLE)]
        for start, end in self.ramp.below(level):
            edges += [(start, SUBJECT), (end, STYLE)]
        phases: list[tuple[float, str]] = []
        for start, source in sorted(edges, key=lambda edge: edge[0]):
            if start >= 1.0:
                continue
            if phases and phases[-1][0] == start:
                phases.pop()
            if not phases or phases[-1][1] != source:
                phases.append((start, source))
        return phases
