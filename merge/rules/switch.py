"""The switch shared by K-LoRA and EST-LoRA: subject iff score_c / γ > score_s · S(p), else style.

With several subjects or styles (see docs/methods.md), each layer first takes the subject, and the style, with the
largest score relative to that LoRA's own mass (its mean L1 for K-LoRA, mean energy for EST, over the decided
layers it adapts); the two winners then meet in the switch with the γ of their own pairing. With one subject and one style that is exactly the two-LoRA rule.
A rule of this family is fully described by per-module scores, the γs and a ramp; its decision depends only on
weights and progress, so each layer's schedule follows in closed form (see `phases`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from ..lora import STYLE, SUBJECT, LoraSet, Selection
from ..schedule import REFERENCE_STEPS
from .method import Method, ParamsCheck, RuleOptions, finite
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


def pairing_gammas(values: dict[str, tuple[float | None, ...]], roles: tuple[str, ...],
                   gamma: Callable[[list[tuple[float, float]]], float]) -> dict[tuple[int, int], float]:
    """γ of every subject/style pairing, from the (subject, style) values of the layers both adapt."""
    gammas = {}
    for i, role_i in enumerate(roles):
        for j, role_j in enumerate(roles):
            if (role_i, role_j) == (SUBJECT, STYLE):
                gammas[i, j] = gamma([(v[i], v[j]) for v in values.values() if None not in (v[i], v[j])])
    return gammas


def means(values: dict[str, tuple[float | None, ...]], sources: int) -> tuple[float, ...]:
    """Each source's mean value (L1 or energy) over the decided layers it adapts: the yardstick subjects (and
    styles) are compared by among themselves."""
    totals, counts = [0.0] * sources, [0] * sources
    for layer in values.values():
        for i, value in enumerate(layer):
            if value is not None:
                totals[i] += value
                counts[i] += 1
    return tuple(total / count if count else 0.0 for total, count in zip(totals, counts))


@dataclass(frozen=True)
class SwitchRule:
    """Scores per module and source (None where a source does not adapt it), each subject/style pairing's own γ
    (times `gamma_scale`), and the ramp S(p). `roles` and `norms` (each source's mass, see `means`) matter only
    with several subjects or styles."""

    reads_features = False  # decides from weights and time alone

    scores: dict[str, tuple[float | None, ...]]
    gammas: dict[tuple[int, int], float]
    ramp: Ramp
    gamma_scale: float = 1.0
    roles: tuple[str, ...] = (SUBJECT, STYLE)
    norms: tuple[float, ...] | None = None

    @property
    def layers(self) -> list[str]:
        return list(self.scores)

    @property
    def gamma(self) -> float:
        """The γ the switch uses, for a pair."""
        (own,) = self.gammas.values()
        return own * self.gamma_scale

    def winners(self, module: str) -> tuple[int, int]:
        """(subject, style) that meet in this layer's switch: each role's largest score relative to its mean."""
        values = self.scores[module]

        def best(role: str) -> int:
            candidates = [i for i, r in enumerate(self.roles) if r == role and values[i] is not None]
            if self.norms is None or len(candidates) == 1:
                return candidates[0]
            return max(candidates, key=lambda i: ratio(values[i], self.norms[i]) if values[i] > 0 else 0.0)

        return best(SUBJECT), best(STYLE)

    def _meeting(self, module: str) -> tuple[int, int, float, float]:
        """The winners, the subject's score over their γ, and the style's score."""
        subject, style = self.winners(module)
        gamma = self.gammas[subject, style] * self.gamma_scale
        return subject, style, self.scores[module][subject] / gamma, self.scores[module][style]

    def choose(self, module: str, p: float) -> Selection:
        """The online decision at progress p, exactly as the formula reads (ties go to style)."""
        subject, style, balanced, score_s = self._meeting(module)
        return (subject,) if balanced > score_s * self.ramp(p) else (style,)

    def balanced(self, beta: float, gamma_scale: float) -> SwitchRule:
        """The same scores with ramp offset β and the γs scaled (the two knobs that trade subject for style)."""
        return replace(self, gamma_scale=gamma_scale, ramp=replace(self.ramp, beta=beta))

    def phases(self, module: str) -> list[tuple[float, Selection]]:
        """Closed form of `choose` over p in [0, 1): (start, selection) pairs, merged where the source repeats."""
        subject, style, balanced, score_s = self._meeting(module)
        level = ratio(balanced, score_s) if balanced > 0 else -math.inf
        edges = [(0.0, (style,))]
        for start, end in self.ramp.below(level):
            edges += [(start, (subject,)), (end, (style,))]
        phases: list[tuple[float, Selection]] = []
        for start, source in sorted(edges, key=lambda edge: edge[0]):
            if start >= 1.0:
                continue
            if phases and phases[-1][0] == start:
                phases.pop()
            if not phases or phases[-1][1] != source:
                phases.append((start, source))
        return phases


class SwitchedMethod(Method):
    """A method of this family (K-LoRA, EST): per-module scores, the γs and a ramp; balanced by β and the γ scale."""

    numbers = ("alpha", "beta")
    balance_knob = True

    def switch(self, loras: LoraSet, settings, device: str | None, progress) -> tuple[SwitchRule, dict]:
        """(rule at γ scale 1, params before `rebalance`) from the weights."""
        raise NotImplementedError

    def build(self, loras: LoraSet, options: RuleOptions, device: str | None = None, progress=iter,
              steps: int = REFERENCE_STEPS) -> tuple[SwitchRule, dict]:
        settings = self.settings(options)
        rule, params = self.switch(loras, settings, device, progress)
        params.update(alpha=rule.ramp.alpha, beta=rule.ramp.beta)
        return self.rebalance(rule, params, rule.ramp.beta, settings.gamma_scale)

    def rebalance(self, rule: SwitchRule, params: dict, beta: float | None,
                  gamma_scale: float) -> tuple[SwitchRule, dict]:
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

    def check_params(self, params: dict, roles: tuple[str, ...], check: ParamsCheck) -> None:
        """One finite `gamma` (a pair), or a `gammas` entry for every subject/style pairing and per source
        `norms`."""
        if "gammas" not in params:
            if not finite(params.get("gamma")):
                check.fail(f"needs a finite number 'gamma' (has {params.get('gamma')!r})")
            return
        gammas, norms = params["gammas"], params.get("norms")
        pairings = {(i, j) for i, a in enumerate(roles) for j, b in enumerate(roles) if (a, b) == (SUBJECT, STYLE)}
        if not (isinstance(gammas, list) and all(isinstance(g, list) and len(g) == 3 and finite(g[2]) for g in gammas)
                and {tuple(g[:2]) for g in gammas} == pairings and len(gammas) == len(pairings)
                and isinstance(norms, list) and len(norms) == len(roles) and all(finite(n) for n in norms)):
            check.fail("has gammas that are not one [subject, style, γ] per pairing of its sources, with one finite "
                       "norm per source")

    def wraps(self, params: dict) -> bool:
        """Whether the file's ramp wraps (K-LoRA's s* pattern)."""
        return False

    def rule_from_file(self, scheduled) -> SwitchRule:
        params = scheduled.params
        scores = {name: record.scores for name, record in scheduled.modules.items() if record.scores is not None}
        if "gammas" in params:
            gammas, norms = {(i, j): gamma for i, j, gamma in params["gammas"]}, tuple(params["norms"])
        else:
            gammas, norms = {(0, 1): params["gamma"]}, None
        ramp = Ramp(params["alpha"], params["beta"], self.wraps(params))
        return SwitchRule(scores=scores, gammas=gammas, ramp=ramp, roles=scheduled.roles, norms=norms)
