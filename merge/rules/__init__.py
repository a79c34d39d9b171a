"""Selection rules: one small module each, and the registry the CLI reads its choices from."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import LoraschedError
from ..lora import STATIC, STYLE, SUBJECT, LoraSet
from . import blocks, direct, est, feature_kl, klora, lora_switch, np_lora, windows
from .ramp import Ramp
from .switch import SwitchRule

METHODS = ("klora", "est", "direct", "feature-kl", "np-lora", "switch", "windows", "blocks")
CALIBRATED = ("feature-kl",)  # input-dependent: scheduled from calibration runs, not from weights
SCHEDULED = ("np-lora", "switch", "windows", "blocks")  # defined by the method's own parameters, no scores
SWITCHED = ("klora", "est")  # a SwitchRule: scores, γs and a ramp
METHOD_OPTIONS = {"mu": "np-lora", "directions": "np-lora", "period": "switch", "windows": "windows",
                  "blocks": "blocks"}  # RuleOptions field -> the one method that takes it


@dataclass(frozen=True)
class RuleOptions:
    """What a user may set; None means the method's published default."""

    pattern: str = "s"
    alpha: float | None = None
    beta: float | None = None
    gamma: str = "trimmed"
    temperature: float = 1.0  # feature-kl softmax temperature
    gamma_scale: float = 1.0  # multiplies the pair's γ: above 1 favours the style, below 1 the subject
    mu: float | None = None  # np-lora projection strength
    directions: int | None = None  # np-lora: style directions projected out (None: all)
    period: int | None = None  # switch: steps per turn
    windows: tuple[float, ...] | None = None  # windows: (subject end, style start)
    blocks: str | None = None  # blocks: `subject=<glob>,style=<glob>`


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
    if method in ("direct", *SCHEDULED) and options.gamma_scale != 1.0:
        raise LoraschedError(f"--gamma-scale: {method} has no balance γ to scale")
    for name, owner in METHOD_OPTIONS.items():
        if getattr(options, name) is not None and owner != method:
            raise LoraschedError(f"--{name}: only --method {owner} takes it")
    if options.mu is not None and not (math.isfinite(options.mu) and options.mu >= 0):
        raise LoraschedError(f"--mu {options.mu}: must be a non-negative finite number")
    if options.directions is not None and options.directions < 1:
        raise LoraschedError(f"--directions {options.directions}: need at least 1")
    if options.period is not None and options.period < 1:
        raise LoraschedError(f"--period {options.period}: need at least 1 step")
    if options.windows is not None and not (len(options.windows) == 2 and all(0 <= w <= 1 for w in options.windows)):
        raise LoraschedError(f"--windows {','.join(map(str, options.windows))}: give a,b with both in [0, 1]")
    if options.blocks is not None:
        blocks.parse_blocks(options.blocks)


def prepare(method: str, loras: LoraSet, options: RuleOptions) -> LoraSet:
    """The LoRAs the file carries: np-lora's projected subjects, the inputs as they are for every other method."""
    if method == "np-lora":
        return np_lora.project(loras, np_lora.DEFAULT_MU if options.mu is None else options.mu, options.directions)
    return loras


def build(method: str, loras: LoraSet, options: RuleOptions, device: str | None = None, progress=iter,
          steps: int = 30):
    """(rule, params recorded in the file) for a weight-only method; `progress` wraps the per-module scoring loop,
    `steps` is the reference step count (switch's τ counts in it).

    EST needs β here: the converter measures it from probe images first when the user gives none.
    """
    validate(method, options)
    if method in CALIBRATED:
        raise ValueError(f"{method} is calibrated from denoising runs, not built from weights")
    if method in SCHEDULED:
        return scheduled(method, loras, options, steps)
    if method == "klora":
        rule = klora.build(loras, options.pattern, options.alpha, options.beta, options.gamma, device, progress)
        params = {"pattern": options.pattern, "gamma_mode": options.gamma}
    elif method == "est":
        if options.beta is None:
            raise LoraschedError("--method est needs β: give --beta, or let probe images measure it")
        rule = est.build(loras, options.beta, est.DEFAULT_ALPHA if options.alpha is None else options.alpha)
        params = {"pattern": "s", "gamma_mode": "trimmed-energy", "beta_source": "given"}
    else:
        return direct.DirectRule.of(loras), {}
    params.update(alpha=rule.ramp.alpha, beta=rule.ramp.beta)
    return rebalance(rule, params, rule.ramp.beta, options.gamma_scale)


def scheduled(method: str, loras: LoraSet, options: RuleOptions, steps: int):
    """(rule, params) of a method defined by its own parameters (docs/methods.md)."""
    if method == "np-lora":
        mu = np_lora.DEFAULT_MU if options.mu is None else options.mu
        return direct.DirectRule.of(loras), {"mu": mu, "directions": options.directions}
    if method == "switch":
        period = lora_switch.DEFAULT_PERIOD if options.period is None else options.period
        rule = lora_switch.LoraSwitchRule.of(loras, period, steps)
        return rule, {"period": period, "order": list(rule.order)}
    if method == "windows":
        subject_end, style_start = options.windows or windows.DEFAULT_WINDOWS
        return windows.WindowsRule.of(loras, subject_end, style_start), {"subject_end": subject_end,
                                                                          "style_start": style_start}
    globs = blocks.block_globs(loras, options.blocks)
    return blocks.select(loras, globs), {role: list(patterns) for role, patterns in globs.items()}


def rebalance(rule: SwitchRule, params: dict, beta: float, gamma_scale: float) -> tuple[SwitchRule, dict]:
    """The same scores under another balance: ramp offset β, and each pairing's own γ times `gamma_scale` (what
    `--gamma-scale` sets and `--balance auto` searches). The params record the γ the rule uses, and the scale;
    with several subjects or styles, every pairing's γ and each LoRA's mean score."""
    rule = rule.balanced(beta, gamma_scale)
    params = {**params, "beta": beta, "gamma_scale": gamma_scale}
    if rule.norms is None:
        params["gamma"] = rule.gamma
    else:
        params["gammas"] = [[i, j, gamma * gamma_scale] for (i, j), gamma in sorted(rule.gammas.items())]
        params["norms"] = list(rule.norms)
    return rule, params


def from_file(scheduled):
    """The rule a scheduled file (`fileformat.ScheduledFile`) was made with, from its recorded parameters and
    per-layer scores: what `verify` runs online next to the replay, without the original LoRA files."""
    method, params, roles = scheduled.method, scheduled.params, scheduled.roles
    if method in CALIBRATED:
        balances = tuple(params["balances"]) if "balances" in params else None
        return feature_kl.FeatureKLRule(gamma=params.get("gamma"), temperature=params["temperature"],
                                        balances=balances)
    carried = {name: tuple(i for i, rank in enumerate(record.ranks) if rank and roles[i] != STATIC)
               for name, record in scheduled.modules.items() if not name.startswith("text_encoder")}
    if method == "switch":
        return lora_switch.LoraSwitchRule(tuple(params["order"]), params["period"], params["steps"], carried)
    if method == "windows":
        return windows.WindowsRule(params["subject_end"], params["style_start"], roles, carried)
    if method not in SWITCHED:  # direct, np-lora, blocks: static, each decided layer keeps its one phase
        layers = scheduled.schedule.layers
        return direct.DirectRule({name: tuple(i for i in layers[name][0][1] if roles[i] != STATIC)
                                  for name, carrying in carried.items()
                                  if {roles[i] for i in carrying} == {SUBJECT, STYLE}})
    wrap = method == "klora" and params.get("pattern") == "s*"
    scores = {name: record.scores for name, record in scheduled.modules.items() if record.scores is not None}
    if "gammas" in params:
        gammas, norms = {(i, j): gamma for i, j, gamma in params["gammas"]}, tuple(params["norms"])
    else:
        gammas, norms = {(0, 1): params["gamma"]}, None
    return SwitchRule(scores=scores, gammas=gammas, ramp=Ramp(params["alpha"], params["beta"], wrap), roles=roles,
                      norms=norms)
