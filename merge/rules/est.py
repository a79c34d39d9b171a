"""EST-LoRA (Zhang & Xiong, 2025): energy ‖ΔW‖_F² scores, an energy-consistent γ, ramp 1.5·p + β.

β = 1 − cos(probe embeddings) comes from probe images; here it is given. γ is the trimmed mean of the same
energy ratios the rule compares (the public code reuses K-LoRA's L1 γ; we correct that, see docs/methods.md).
"""

from __future__ import annotations

from ..errors import LoraschedError
from ..lora import SOURCES, LoraSet
from .method import ALPHA, BETA, GAMMA_SCALE, RuleOptions
from .ramp import Ramp
from .switch import SwitchedMethod, SwitchRule, means, pairing_gammas, ratio, trimmed_mean_gamma

DEFAULT_ALPHA = 1.5


def build(loras: LoraSet, beta: float, alpha: float = DEFAULT_ALPHA) -> SwitchRule:
    switched = [source.role in SOURCES for source in loras.sources]
    scores = {}
    for name in loras.decided:
        modules = [source.lora.modules.get(name) if on else None for source, on in zip(loras.sources, switched)]
        scores[name] = tuple(None if module is None else module.energy() for module in modules)
    roles = tuple(source.role for source in loras.sources)
    gammas = pairing_gammas(scores, roles, lambda values: trimmed_mean_gamma([ratio(c, s) for c, s in values]))
    norms = None if loras.is_pair else means(scores, len(roles))
    return SwitchRule(scores=scores, gammas=gammas, ramp=Ramp(alpha, beta), roles=roles, norms=norms)


class EstMethod(SwitchedMethod):
    name = "est"
    summary = "EST-LoRA: energy ‖ΔW‖² scores, an energy γ, ramp 1.5·p + β with β from probe images (2025)."
    options = (ALPHA, BETA, GAMMA_SCALE)

    def needs_probe(self, options: RuleOptions) -> bool:
        return "beta" not in options

    def switch(self, loras: LoraSet, settings, device: str | None, progress) -> tuple[SwitchRule, dict]:
        if settings.beta is None:
            raise LoraschedError("--method est needs β: give --beta, or let probe images measure it")
        rule = build(loras, settings.beta, DEFAULT_ALPHA if settings.alpha is None else settings.alpha)
        return rule, {"pattern": "s", "gamma_mode": "trimmed-energy", "beta_source": "given"}


METHOD = EstMethod()
