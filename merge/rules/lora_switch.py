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
from ..lora import STYLE, SUBJECT, LoraSet, Selection

DEFAULT_PERIOD = 5  # the paper's τ


@dataclass(frozen=True)
class LoraSwitchRule:
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
