"""Selection rules: one small module each, and the registry the CLI reads its choices from."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import LoraschedError
from ..lora import LoraPair
from . import direct, est, feature_kl, klora
from .ramp import Ramp
from .switch import SwitchRule

METHODS = ("klora", "est", "direct", "feature-kl")
CALIBRATED = ("feature-kl",)  # input-dependent: scheduled from calibration runs, not from weights


@dataclass(frozen=True)
class RuleOptions:
    """What a user may set; None means the method's published default."""

    pattern: str = "s"
    alpha: float | None = None
    beta: float | None = None
    gamma: str = "trimmed"
    temperature: float = 1.0  # feature-kl softmax temperature
    gamma_scale: float = 1.0  # multiplies the pair's γ: above 1 favours the style, below 1 the subject


def validate(method: str, options: RuleOptions) -> None:
    """Refuse a method/option combination before any file is read."""
    if method not in METHODS:
        raise LoraschedError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if method == "klora" and options.pattern not in klora.PATTERNS:
        raise LoraschedError(f"unknown K-LoRA pattern {options.pattern!r} (choose from {', '.join(klora.PATTERNS)})")
    for name in ("alpha", "beta", "temperature"):
        value = getattr(options, name)
        if value is not None and not math.isfinite(value):
            raise LoraschedError(f"--{name} {value}: must be a finite number")
    if method == "feature-kl" and not options.temperature > 0:
        raise LoraschedError(f"--temperature {options.temperature}: must be positive")
    if not (math.isfinite(options.gamma_scale) and options.gamma_scale > 0):
        raise LoraschedError(f"--gamma-scale {options.gamma_scale}: must be a positive finite number")
    if method == "direct" and options.gamma_scale != 1.0:
        raise LoraschedError("--gamma-scale: direct has no balance γ to scale")


def build(method: str, pair: LoraPair, options: RuleOptions, device: str | None = None, progress=iter):
    """(rule, params recorded in the file) for a weight-only method; `progress` wraps the per-module scoring loop.

    EST needs β here: the converter measures it from probe images first when the user gives none.
    """
    validate(method, options)
    if method in CALIBRATED:
        raise ValueError(f"{method} is calibrated from denoising runs, not built from weights")
    if method == "klora":
        rule = klora.build(pair, options.pattern, options.alpha, options.beta, options.gamma, device, progress)
        params = {"pattern": options.pattern, "gamma_mode": options.gamma}
    elif method == "est":
        if options.beta is None:
            raise LoraschedError("--method est needs β: give --beta, or let probe images measure it")
        rule = est.build(pair, options.beta, est.DEFAULT_ALPHA if options.alpha is None else options.alpha)
        params = {"pattern": "s", "gamma_mode": "trimmed-energy", "beta_source": "given"}
    else:
        return direct.DirectRule(), {}
    params.update(alpha=rule.ramp.alpha, beta=rule.ramp.beta, gamma=rule.gamma)
    return rebalance(rule, params, rule.ramp.beta, options.gamma_scale)


def rebalance(rule: SwitchRule, params: dict, beta: float, gamma_scale: float) -> tuple[SwitchRule, dict]:
    """The same scores under another balance: ramp offset β, and the pair's own γ times `gamma_scale` (what
    `--gamma-scale` sets and `--balance auto` searches). The params record the γ the rule uses, and the scale."""
    gamma = params["gamma"] / params.get("gamma_scale", 1.0) * gamma_scale
    return rule.balanced(beta, gamma), {**params, "beta": beta, "gamma": gamma, "gamma_scale": gamma_scale}


def from_file(method: str, params: dict, modules: dict[str, dict]):
    """The rule a scheduled file was made with, from its recorded parameters and per-layer scores: what
    `verify` runs online next to the replay, without the original LoRA files."""
    if method == "direct":
        return direct.DirectRule()
    if method in CALIBRATED:
        return feature_kl.FeatureKLRule(gamma=params["gamma"], temperature=params["temperature"])
    wrap = method == "klora" and params.get("pattern") == "s*"
    scores = {name: tuple(record["scores"]) for name, record in modules.items() if "scores" in record}
    return SwitchRule(scores=scores, gamma=params["gamma"], ramp=Ramp(params["alpha"], params["beta"], wrap))
