"""LoRA Switch (Zhong et al., arXiv 2402.16843): the LoRAs take turns, each active alone for τ steps, in order.

At step n of an N-step run the active LoRA is the ⌊n / τ⌋-th modulo the number of LoRAs (the paper's Eq. 3), in
every layer at once; a layer the active LoRA does not adapt runs without a LoRA for those steps. Here the turns
are laid on the progress axis (turn m starts at p = m·τ / N for the reference N of `--steps`), so the file replays
the same share of turns at any step count. Order: the subjects, then the styles, as given (the paper finds
starting with the character LoRA best and starting with the style worst).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import LoraschedError
from ..lora import STATIC, STYLE, SUBJECT, LoraSet, Selection
from ..schedule import REFERENCE_STEPS
from .method import Method, Option, ParamsCheck, RuleOptions, carried, count

DEFAULT_PERIOD = 5  # the paper's τ


@dataclass(frozen=True)
class LoraSwitchRule:
    reads_features = False  # decides from weights and time alone

    order: tuple[int, ...]  # the sources that take turns
    period: int  # τ, in steps of the reference run
    steps: int  # N of the reference run: turn m starts at p = m·τ / N
    adapting: dict[str, Selection]  # per layer, the turn-taking sources that adapt it

    @classmethod
    def of(cls, loras: LoraSet, period: int, steps: int) -> LoraSwitchRule:
        order = loras.indices(SUBJECT) + loras.indices(STYLE)
        turns = -(-steps // period)
        if turns < len(order):
            left = ", ".join(Path(loras.sources[i].lora.path).name for i in order[turns:])
            raise LoraschedError(f"--period {period}: {turns} turn(s) in {steps} steps leave {left} without one; "
                                 "give a shorter --period or more --steps")
        return cls(order, period, steps, {name: loras.switched(name) for name in loras.denoiser_modules})

    @property
    def layers(self) -> list[str]:
        return list(self.adapting)

    def start(self, turn: int) -> float:
        return turn * self.period / self.steps

    def turn(self, p: float) -> int:
        """The last turn started at p, compared with the same starts the phases use."""
        turn = int(p * self.steps / self.period)
        while self.start(turn + 1) <= p:
            turn += 1
        while turn > 0 and self.start(turn) > p:
            turn -= 1
        return turn

    def choose(self, module: str, p: float) -> Selection:
        active = self.order[self.turn(p) % len(self.order)]
        return (active,) if active in self.adapting[module] else ()

    def phases(self, module: str) -> list[tuple[float, Selection]]:
        phases: list[tuple[float, Selection]] = []
        turn = 0
        while (start := self.start(turn)) < 1.0:
            selection = self.choose(module, start)
            if not phases or phases[-1][1] != selection:
                phases.append((start, selection))
            turn += 1
        return phases


class SwitchMethod(Method):
    name = "switch"
    summary = "LoRA Switch: the LoRAs take turns, each active alone for τ steps, in every layer at once (2024)."
    options = (Option("period", int, f"switch: steps each LoRA stays active before the next takes over (default "
                      f"{DEFAULT_PERIOD}), at --steps.", default=DEFAULT_PERIOD,
                      problem=lambda period: None if period >= 1 else "need at least 1 step"),)
    numbers = ("period", "steps")

    def build(self, loras: LoraSet, options: RuleOptions, device: str | None = None, progress=iter,
              steps: int = REFERENCE_STEPS) -> tuple[LoraSwitchRule, dict]:
        period = self.settings(options).period
        rule = LoraSwitchRule.of(loras, period, steps)
        return rule, {"period": period, "order": list(rule.order)}

    def check_params(self, params: dict, roles: tuple[str, ...], check: ParamsCheck) -> None:
        order, switched = params.get("order"), [i for i, role in enumerate(roles) if role != STATIC]
        if not (isinstance(order, list) and sorted(order) == switched and count(params["period"])):
            check.fail(f"has switch order {order!r} and period {params['period']!r}, not every subject and style "
                       "once and a positive whole number of steps")

    def rule_from_file(self, scheduled) -> LoraSwitchRule:
        params = scheduled.params
        return LoraSwitchRule(tuple(params["order"]), params["period"], params["steps"], carried(scheduled))


METHOD = SwitchMethod()
