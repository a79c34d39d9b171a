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
import math
from dataclasses import dataclass

from .lora import BOTH, STYLE, SUBJECT, LoraPair

Phase = tuple[float, str]
AXIS_PROGRESS = "progress"
AXIS_NOISE = "noise"
AXES = (AXIS_PROGRESS, AXIS_NOISE)
SOURCE_CHOICES = (SUBJECT, STYLE, BOTH)


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
        return cls.from_data(json.loads(text))

    @classmethod
    def from_data(cls, data: dict) -> "Schedule":
        """A schedule from its JSON form; a ValueError names the first thing that breaks the format."""
        axis, layers = data.get("axis"), data.get("layers")
        if axis not in AXES:
            raise ValueError(f"has axis {axis!r}, not one of {', '.join(AXES)}")
        if not isinstance(layers, dict) or not layers:
            raise ValueError("lists no layers")
        parsed = {name: _phases(name, phases) for name, phases in layers.items()}
        agreement, bins = data.get("agreement"), data.get("bins")
        if agreement is None:
            return cls(layers=parsed, axis=axis)
        if not (isinstance(bins, list) and bins and all(_number(b) for b in bins) and
                isinstance(agreement, dict) and all(isinstance(a, list) and all(_number(x) for x in a)
                                                    for a in agreement.values())):
            raise ValueError("has agreement without numeric bins and per-layer shares")
        for name, phases in parsed.items():
            if any(start not in bins for start, _ in phases) or len(agreement.get(name, ())) not in (0, len(bins)):
                raise ValueError(f"has phases or agreement for {name} that do not fall on its bins")
        return cls(layers=parsed, axis=axis, agreement={name: tuple(a) for name, a in agreement.items()},
                   bins=tuple(bins))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _phases(name: str, phases) -> tuple[Phase, ...]:
    """One layer's phases, checked: [[start, source], …], starts rising from 0 within [0, 1]."""
    if not isinstance(phases, list) or not phases or not all(
            isinstance(p, list) and len(p) == 2 and _number(p[0]) and p[1] in SOURCE_CHOICES for p in phases):
        raise ValueError(f"has phases {str(phases)[:80]} for {name}, not [[start, subject|style|both], …]")
    starts = [float(start) for start, _ in phases]
    if starts[0] != 0.0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] > 1.0:
        raise ValueError(f"has phase starts {starts} for {name}, not rising from 0 within [0, 1]")
    return tuple((start, source) for start, (_, source) in zip(starts, phases))


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
