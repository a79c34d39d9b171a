"""Selection rules: one small module each, and the registry the CLI reads its choices from."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LoraschedError
from ..lora import LoraPair
from . import direct, est, klora

METHODS = ("klora", "est", "direct")


@dataclass(frozen=True)
class RuleOptions:
    """What a user may set; None means the method's published default."""

    pattern: str = "s"
    alpha: float | None = None
    beta: float | None = None
    gamma: str = "trimmed"


def validate(method: str, options: RuleOptions) -> None:
    """Refuse a method/option combination before any file is read."""
    if method not in METHODS:
        raise LoraschedError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if method == "klora" and options.pattern not in klora.PATTERNS:
        raise LoraschedError(f"unknown K-LoRA pattern {options.pattern!r} (choose from {', '.join(klora.PATTERNS)})")
    if method == "est" and options.beta is None:
        raise LoraschedError("--method est needs --beta (β = 1 − similarity of the two probe images)")


def build(method: str, pair: LoraPair, options: RuleOptions, device: str | None = None, progress=iter):
    """(rule, params recorded in the file) for a method name; `progress` wraps the per-module scoring loop."""
    validate(method, options)
    if method == "klora":
        rule = klora.build(pair, options.pattern, options.alpha, options.beta, options.gamma, device, progress)
        params = {"pattern": options.pattern, "gamma_mode": options.gamma}
    elif method == "est":
        rule = est.build(pair, options.beta, est.DEFAULT_ALPHA if options.alpha is None else options.alpha)
        params = {"pattern": "s", "gamma_mode": "trimmed-energy", "beta_source": "given"}
    else:
        return direct.DirectRule(), {}
    params.update(alpha=rule.ramp.alpha, beta=rule.ramp.beta, gamma=rule.gamma)
    return rule, params
