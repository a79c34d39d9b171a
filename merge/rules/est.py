"""EST-LoRA (Zhang & Xiong, 2025): energy ‖ΔW‖_F² scores, an energy-consistent γ, ramp 1.5·p + β.

β = 1 − cos(probe embeddings) comes from probe images; here it is given. γ is the trimmed mean of the same
energy ratios the rule compares (the public code reuses K-LoRA's L1 γ; we correct that, see docs/methods.md).
"""

from __future__ import annotations

from ..lora import LoraPair
from .ramp import Ramp
from .switch import SwitchRule, ratio, trimmed_mean_gamma

DEFAULT_ALPHA = 1.5


def build(pair: LoraPair, beta: float, alpha: float = DEFAULT_ALPHA) -> SwitchRule:
    scores = {
        name: (pair.subject.modules[name].energy(), pair.style.modules[name].energy()) for name in pair.both_adapted
    }
    gamma = trimmed_mean_gamma([ratio(c, s) for c, s in scores.values()])
    return SwitchRule(scores=scores, gamma=gamma, ramp=Ramp(alpha, beta))
