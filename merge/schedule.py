"""The Schedule: per layer, which source is active as a function of a time coordinate in [0, 1].

Two time axes, both running from 0 at the first (noisiest) step to 1 at the end:
- `progress`: p = n / N, the step's position in the run. Weight-only rules (K-LoRA, EST) are defined on it, so
  their switch points are exact and one file replays at any step count.
- `noise`: q = 1 − t / T_train, from the model's own timestep t (ComfyUI's "start percent"). Calibrated rules
  live here: a decision recorded at a noise level replays at that noise level for any step count or scheduler.

Each layer is a short list of phases (start, source), source one of subject / style / both, sorted by start and
beginning at 0; a phase lasts until the next one starts. Serialised as compact JSON in the file's metadata, with
optional per-phase agreement fractions for calibrated schedules.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass

from .lora import BOTH, STYLE, SUBJECT, LoraPair

Phase = tuple[float, str]
AXIS_PROGRESS = "progress"
AXIS_NOISE = "noise"
AXES = (AXIS_PROGRESS, AXIS_NOISE)


@dataclass(frozen=True)
class Schedule:
    layers: dict[str, tuple[Phase, ...]]
    axis: str = AXIS_PROGRESS
    agreement: dict[str, tuple[float, ...]] | None = None  # calibrated: per layer, per bin, share of the votes
    bins: tuple[float, ...] | None = None  # calibrated: the start of each time bin

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
        data = {"axis": self.axis, "layers": {name: [list(p) for p in phases] for name, phases in self.layers.items()}}
        if self.agreement is not None:
            data["agreement"] = {name: [round(a, 4) for a in shares] for name, shares in self.agreement.items()}
            data["bins"] = list(self.bins)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        data = json.loads(text)
        agreement = data.get("agreement")
        return cls(
            layers={name: tuple((float(s), str(src)) for s, src in phases) for name, phases in data["layers"].items()},
            axis=data["axis"],
            agreement=None if agreement is None else {name: tuple(a) for name, a in agreement.items()},
            bins=None if agreement is None else tuple(data["bins"]),
        )


def constant(source: str) -> tuple[Phase, ...]:
    return ((0.0, source),)


def fixed_phases(name: str, pair: LoraPair) -> tuple[Phase, ...]:
    """A module no rule decides: the LoRA that adapts it, or both for text-encoder modules both adapt (they run
    once per prompt, outside the denoising loop)."""
    if name in pair.subject.modules and name in pair.style.modules:
        return constant(BOTH)
    return constant(SUBJECT if name in pair.subject.modules else STYLE)


def from_rule(rule, pair: LoraPair) -> Schedule:
    """Closed-form schedule of a weight-only rule over every module either LoRA adapts."""
    both = set(pair.both_adapted)
    layers = {
        name: tuple(rule.phases(name)) if name in both else fixed_phases(name, pair) for name in pair.module_names
    }
    return Schedule(layers=layers)
