"""The Schedule: per layer, which source is active as a function of denoising progress p in [0, 1).

Each layer is a short list of phases (start, source), source one of subject / style / both, sorted by start and
beginning at 0; a phase lasts until the next one starts. Weight-only rules give exact switch points, so one file
replays at any step count. Serialised as compact JSON inside the exported file's metadata.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass

from .lora import BOTH, STYLE, SUBJECT, LoraPair

Phase = tuple[float, str]
AXIS_PROGRESS = "progress"


@dataclass(frozen=True)
class Schedule:
    layers: dict[str, tuple[Phase, ...]]
    axis: str = AXIS_PROGRESS

    def active(self, layer: str, p: float) -> str:
        phases = self.layers[layer]
        return phases[bisect.bisect_right([start for start, _ in phases], p) - 1][1]

    def switch_points(self, layer: str) -> list[float]:
        return [start for start, _ in self.layers[layer][1:]]

    def static_weights(self, layer: str) -> tuple[float, float]:
        """Fraction of progress each source is active: what a plain loader should apply as a fixed mix."""
        phases = self.layers[layer]
        ends = [start for start, _ in phases[1:]] + [1.0]
        weights = {SUBJECT: 0.0, STYLE: 0.0}
        for (start, source), end in zip(phases, ends):
            for target in (SUBJECT, STYLE) if source == BOTH else (source,):
                weights[target] += end - start
        return weights[SUBJECT], weights[STYLE]

    def to_json(self) -> str:
        return json.dumps(
            {"axis": self.axis, "layers": {name: [list(p) for p in phases] for name, phases in self.layers.items()}},
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        data = json.loads(text)
        return cls(
            layers={name: tuple((float(s), str(src)) for s, src in phases) for name, phases in data["layers"].items()},
            axis=data["axis"],
        )


def constant(source: str) -> tuple[Phase, ...]:
    return ((0.0, source),)


def from_rule(rule, pair: LoraPair) -> Schedule:
    """Closed-form schedule of a weight-only rule over every module either LoRA adapts.

    The rule decides the denoiser's both-adapted modules; a module only one LoRA adapts keeps that LoRA, and
    text-encoder modules keep both (they run once per prompt, outside the denoising loop).
    """
    both = set(pair.both_adapted)
    layers = {}
    for name in pair.module_names:
        if name in both:
            layers[name] = tuple(rule.phases(name))
        elif name in pair.subject.modules and name in pair.style.modules:
            layers[name] = constant(BOTH)
        else:
            layers[name] = constant(SUBJECT if name in pair.subject.modules else STYLE)
    return Schedule(layers=layers)
