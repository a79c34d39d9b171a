"""The Schedule: per layer, which source is active as a function of a time coordinate in [0, 1].

Two time axes, both running from 0 at the first (noisiest) step to 1 at the end:
- `progress`: p = n / N, the step's position in the run. Weight-only rules (K-LoRA, EST) are defined on it, so
  their switch points are exact and one file replays at any step count.
- `noise`: q = 1 − t / T_train, from the model's own timestep t (ComfyUI's "start percent"). Calibrated rules
  live here: a decision recorded at a noise level replays at that noise level for any step count or scheduler.

Each layer is a short list of phases (start, selection), the selection being the indices of the sources active
(`LoraSet.sources`; empty where none is), sorted by start and beginning at 0; a phase lasts until the next one
starts. Serialised as compact JSON in the file's metadata, with optional per-phase agreement fractions for
calibrated schedules. Format-1 files name the selection `subject`, `style` or `both` (sources 0, 1 or both).
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass

from .lora import PAIR_SELECTIONS, STATIC, LoraSet, Selection

Phase = tuple[float, Selection]
AXIS_PROGRESS = "progress"
AXIS_NOISE = "noise"
AXES = (AXIS_PROGRESS, AXIS_NOISE)


@dataclass(frozen=True)
class Schedule:
    layers: dict[str, tuple[Phase, ...]]
    axis: str = AXIS_PROGRESS
    agreement: dict[str, tuple[float, ...]] | None = None  # calibrated: per layer, per bin, share of the votes
    bins: tuple[float, ...] | None = None  # calibrated: the start of each time bin

    def active(self, layer: str, p: float) -> Selection:
        phases = self.layers[layer]
        return phases[bisect.bisect_right([start for start, _ in phases], p) - 1][1]

    def static_weights(self, layer: str, sources: int) -> tuple[float, ...]:
        """Fraction of progress each of the `sources` is active: what a plain loader should apply as a fixed mix."""
        phases = self.layers[layer]
        ends = [start for start, _ in phases[1:]] + [1.0]
        weights = [0.0] * sources
        for (start, selection), end in zip(phases, ends):
            for index in selection:
                weights[index] += end - start
        return tuple(weights)

    def to_json(self) -> str:
        data = {"axis": self.axis,
                "layers": {name: [[start, list(selection)] for start, selection in phases]
                           for name, phases in self.layers.items()}}
        if self.agreement is not None:
            data["agreement"] = {name: [round(a, 4) for a in shares] for name, shares in self.agreement.items()}
            data["bins"] = list(self.bins)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, sources: int) -> "Schedule":
        return cls.from_data(json.loads(text), sources)

    @classmethod
    def from_data(cls, data: dict, sources: int, named: bool = False) -> "Schedule":
        """A schedule over `sources` sources from its JSON form (`named`: format 1's subject/style/both); a
        ValueError names the first thing that breaks the format."""
        axis, layers = data.get("axis"), data.get("layers")
        if axis not in AXES:
            raise ValueError(f"has axis {axis!r}, not one of {', '.join(AXES)}")
        if not isinstance(layers, dict) or not layers:
            raise ValueError("lists no layers")
        parsed = {name: _phases(name, phases, sources, named) for name, phases in layers.items()}
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


def _selection(value, sources: int, named: bool) -> Selection | None:
    if named:
        return PAIR_SELECTIONS.get(value) if isinstance(value, str) else None
    if not (isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
        return None
    selection = tuple(value)
    ok = list(selection) == sorted(set(selection)) and all(0 <= i < sources for i in selection)
    return selection if ok else None


def _phases(name: str, phases, sources: int, named: bool) -> tuple[Phase, ...]:
    """One layer's phases, checked: [[start, selection], …], starts rising from 0 within [0, 1]."""
    shape = "subject|style|both" if named else f"[source index < {sources}, …] ascending"
    if not isinstance(phases, list) or not phases or not all(
            isinstance(p, list) and len(p) == 2 and _number(p[0]) and _selection(p[1], sources, named) is not None
            for p in phases):
        raise ValueError(f"has phases {str(phases)[:80]} for {name}, not [[start, {shape}], …]")
    starts = [float(start) for start, _ in phases]
    if starts[0] != 0.0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] > 1.0:
        raise ValueError(f"has phase starts {starts} for {name}, not rising from 0 within [0, 1]")
    return tuple((start, _selection(value, sources, named)) for start, (_, value) in zip(starts, phases))


def constant(selection: Selection) -> tuple[Phase, ...]:
    return ((0.0, selection),)


def fixed_phases(name: str, loras: LoraSet) -> tuple[Phase, ...]:
    """A module no rule decides: every LoRA that adapts it (text-encoder modules run once per prompt, outside the
    denoising loop; a denoiser module only subjects, or only styles, adapt has nothing to choose between)."""
    return constant(loras.adapting(name))


def with_riders(phases, riders: Selection) -> tuple[Phase, ...]:
    """The phases with the `static` sources that adapt the layer switched on in each."""
    return tuple((start, tuple(sorted(selection + riders))) for start, selection in phases)


def from_rule(rule, loras: LoraSet) -> Schedule:
    """Closed-form schedule of a weight-only rule over every module any LoRA adapts; the rule decides its `layers`
    among the subjects and styles there, the static LoRAs ride along. A layer no LoRA is ever active in (switch,
    windows) is left out: the file does not touch it."""
    decided = set(rule.layers)
    statics = set(loras.indices(STATIC))
    layers = {
        name: with_riders(rule.phases(name), tuple(i for i in loras.adapting(name) if i in statics))
        if name in decided else fixed_phases(name, loras) for name in loras.module_names
    }
    return Schedule(layers={name: phases for name, phases in layers.items() if any(s for _, s in phases)})
