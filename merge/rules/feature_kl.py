"""feature-kl: lorasched's precise form of the dynamic feature fusion of Cao et al. (arXiv 2602.15539).

At a both-adapted layer with base output h0 = W0 x and LoRA outputs d_k = ΔW_k x (from the factors, never a
dense ΔW), each token's channels become a distribution P = softmax(h / (τ · rms(h0))), with the same per-token
scale for all three so only the LoRA's change moves it. The divergence of LoRA k is D_k = mean over tokens of
KL(P_{h0+d_k} ‖ P_{h0}): how far that LoRA pulls this layer's features, for this input, away from the base.
The layer takes the LoRA that pulls further after balancing: subject iff D_c > γ · D_s (ties go to style, as in
K-LoRA). γ is the geometric mean of D_c / D_s over a balance run (both LoRAs applied, every layer and step), so
a LoRA that is simply larger does not win everywhere. Time enters through the features of each step only.

With several subjects or styles, the layer takes the LoRA with the largest balanced divergence D_k / b_k, b_k the
geometric mean of LoRA k's own divergences over the balance run (all LoRAs applied); the subjects' b_k carry the
γ scale. For a pair that is the rule above: γ = b_c / b_s. Ties go to the later LoRA (the style, for a pair).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .method import GAMMA_SCALE, Method, Option, ParamsCheck, RuleOptions, finite, positive

DEFAULT_TEMPERATURE = 1.0


def token_channels(h: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(batch, tokens, channels) in float32 from a Linear (channels last) or Conv2d (channels at dim 1) output."""
    if channel_dim != -1:
        h = h.movedim(channel_dim, -1)
    return h.reshape(h.shape[0], -1, h.shape[-1]).float()


def divergences(h0: torch.Tensor, *deltas: torch.Tensor, channel_dim: int = -1,
                temperature: float = 1.0) -> tuple[torch.Tensor, ...]:
    """D_k of each LoRA output d_k, one value per batch sample."""
    h0 = token_channels(h0, channel_dim)
    scale = temperature * h0.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    log_base = torch.log_softmax(h0 / scale, -1)

    def kl_from_base(delta: torch.Tensor) -> torch.Tensor:
        log_lora = torch.log_softmax((h0 + token_channels(delta, channel_dim)) / scale, -1)
        return (log_lora.exp() * (log_lora - log_base)).sum(-1).mean(-1)

    return tuple(kl_from_base(delta) for delta in deltas)


def balance(ratios: list[float]) -> float:
    """γ (or a LoRA's b_k): the geometric mean of the finite, positive values of the balance run (1 when there are
    none)."""
    logs = [math.log(r) for r in ratios if math.isfinite(r) and r > 0]
    return math.exp(sum(logs) / len(logs)) if logs else 1.0


@dataclass(frozen=True)
class FeatureKLRule:
    """The decision given the divergences: a pair's `gamma`, or each source's balance `balances` (several subjects
    or styles; None for a source the rule does not select); neither means the balance run (every LoRA applied,
    divergences recorded)."""

    gamma: float | None = None
    temperature: float = DEFAULT_TEMPERATURE
    balances: tuple[float | None, ...] | None = None

    @classmethod
    def balanced(cls, measured: float | list[float | None] | None, gamma_scale: float, roles: tuple[str, ...],
                 temperature: float) -> FeatureKLRule:
        """The rule a calibration decides with, from its balance run's γ (a pair) or per-source b_k, scaled."""
        if measured is None or not isinstance(measured, list):
            return cls(gamma=None if measured is None else measured * gamma_scale, temperature=temperature)
        return cls(temperature=temperature, balances=tuple(
            None if b is None else b * gamma_scale if role == "subject" else b for b, role in zip(measured, roles)))

    reads_features = True  # decides from each call's features: online, it needs every LoRA's output

    @property
    def calibrated(self) -> bool:
        return self.gamma is not None or self.balances is not None

    def with_balance(self, measured: float | list[float | None] | None, gamma_scale: float,
                     roles: tuple[str, ...]) -> FeatureKLRule:
        """This rule's temperature, deciding with the balance `measured` by a balance run, scaled."""
        return FeatureKLRule.balanced(measured, gamma_scale, roles, self.temperature)

    def subject_mask(self, d_c: torch.Tensor, d_s: torch.Tensor) -> torch.Tensor:
        return d_c > self.gamma * d_s

    def winners(self, divergences: dict[int, torch.Tensor]) -> torch.Tensor:
        """Per sample, the source with the largest D_k / b_k (ties to the later source)."""
        sources = sorted(divergences)
        balanced = torch.stack([divergences[k] / self.balances[k] for k in sources])
        flipped = balanced.flip(0).argmax(0)  # argmax keeps the first maximum: flipped, that is the later source
        return torch.tensor(sources, device=flipped.device)[len(sources) - 1 - flipped]


class FeatureKLMethod(Method):
    name = "feature-kl"
    summary = "Dynamic feature fusion: per layer and step, the LoRA whose features diverge most from the base's."
    options = (Option("temperature", float, "feature-kl softmax temperature.", default=DEFAULT_TEMPERATURE,
                      problem=positive), GAMMA_SCALE)
    numbers = ("temperature",)
    calibrated = True
    balance_knob = True
    takes_static = False  # a static LoRA would change the features it measures

    def balance_run_rule(self, options: RuleOptions) -> FeatureKLRule:
        """The rule of the balance run (every LoRA applied, divergences recorded) that fixes γ."""
        return FeatureKLRule(temperature=self.settings(options).temperature)

    def calibrated_rule(self, measured, options: RuleOptions, roles: tuple[str, ...]) -> tuple[FeatureKLRule, dict]:
        """(rule, params) from the balance run's γ (a pair) or per-source balances, at the options' γ scale."""
        settings = self.settings(options)
        rule = FeatureKLRule.balanced(measured, settings.gamma_scale, roles, settings.temperature)
        params = {**({"gamma": rule.gamma} if rule.balances is None else {"balances": list(rule.balances)}),
                  "gamma_scale": settings.gamma_scale, "temperature": settings.temperature}
        return rule, params

    def check_params(self, params: dict, roles: tuple[str, ...], check: ParamsCheck) -> None:
        balances = params.get("balances")
        if not finite(params.get("gamma")) and not (
                isinstance(balances, list) and len(balances) == len(roles) and
                all(b is None or (finite(b) and b > 0) for b in balances)):
            check.fail("needs a finite 'gamma' (a pair) or one positive 'balances' entry per source for feature-kl")

    def rule_from_file(self, scheduled) -> FeatureKLRule:
        params = scheduled.params
        balances = tuple(params["balances"]) if "balances" in params else None
        return FeatureKLRule(gamma=params.get("gamma"), temperature=params["temperature"], balances=balances)


METHOD = FeatureKLMethod()
