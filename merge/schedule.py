"""Schedules built from rules. The `Schedule` value (per layer, which sources are active as a function of a time
coordinate in [0, 1]) lives in schema.py, shared with every reader of the file; it is re-exported here.

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

from .lora import STATIC, LoraSet, Selection
from .schema import AXES, AXIS_NOISE, AXIS_PROGRESS, Phase, Schedule

# The step count a weight-only file is described at (inspect's steps, switch's turns) when none is given: the files
# replay at any count.
REFERENCE_STEPS = 30

__all__ = ["AXES", "AXIS_NOISE", "AXIS_PROGRESS", "Phase", "REFERENCE_STEPS", "Schedule", "constant", "fixed_phases", "from_rule",
           "with_riders"]


def constant(selection: Selection) -> tuple[Phase, ...]:
    return (Phase(0.0, selection),)


def fixed_phases(name: str, loras: LoraSet) -> tuple[Phase, ...]:
    """A module no rule decides: every LoRA that adapts it (text-encoder modules run once per prompt, outside the
    denoising loop; a denoiser module only subjects, or only styles, adapt has nothing to choose between)."""
    return constant(loras.adapting(name))


def with_riders(phases, riders: Selection) -> tuple[Phase, ...]:
    """The phases with the `static` sources that adapt the layer switched on in each."""
    return tuple(Phase(start, tuple(sorted(selection + riders))) for start, selection in phases)


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
