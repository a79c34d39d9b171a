"""Replaying a scheduled LoRA file in a diffusers pipeline: `handle = attach(pipe, path)`, `handle.detach()`.

A forward pre-hook on the denoiser reads the `timestep` it is called with, turns it into the schedule's time
coordinate (denoising progress, or noise level for calibrated schedules; see schedule.py), and rewrites only
the layers whose source changed. Nothing is scored at inference: the per-step work is a lookup, plus writes at
switch points. Two modes:

- `fused` (default): each layer's active delta is merged into its base weight; switching layers are re-merged at
  their switch points from an exact copy of the original weight (no drift in fp16/bf16). Between switches the
  denoiser runs at the base model's own speed; weights change in place, so `torch.compile`d denoisers keep their
  graphs. `cross_attention_kwargs={"scale": s}` has no effect on fused layers.
- `unfused`: the factors are split back into a subject and a style adapter, loaded with the pipeline's own
  `load_lora_weights`; a switch sets which adapter is active in that layer (one LoRA path per layer, not two with
  a zero scale). Honors the LoRA scale, costs a plain unfused LoRA; switching recompiles a compiled denoiser.

Import-light on purpose: torch, safetensors, json (through fileformat) and the objects it is handed.
"""

from __future__ import annotations

import bisect
from functools import partial

import torch

from . import fileformat
from .lora import BOTH, SOURCES, STYLE, SUBJECT, denoiser_name
from .quiet import collected_loading_messages, key_problems
from .schedule import AXES, AXIS_PROGRESS, Schedule

MODES = ("fused", "unfused")
ADAPTERS = {SUBJECT: "lorasched_subject", STYLE: "lorasched_style"}
_ACTIVE = {SUBJECT: (SUBJECT,), STYLE: (STYLE,), BOTH: (SUBJECT, STYLE)}


def source_factors(scheduled: fileformat.ScheduledFile) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Undo the export's rank concatenation: per module, per source, (down, up) with the static weight divided out."""
    factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, record in scheduled.modules.items():
        key = record["key"]
        down = scheduled.tensors[f"{key}.lora_down.weight"]
        up = scheduled.tensors[f"{key}.lora_up.weight"]
        offset, parts = 0, {}
        for source, rank, weight in zip(SOURCES, record["ranks"], record["static"]):
            if rank:
                parts[source] = (down[offset : offset + rank].float() / weight, up[:, offset : offset + rank].float())
                offset += rank
        factors[name] = parts
    return factors


class Clock:
    """Where a denoiser call sits on a schedule's time axis, read from the `timestep` it is called with.

    `progress`: the position of the timestep among the scheduler's distinct timesteps, n / N (second-order
    schedulers that call twice per step, and img2img runs that start late, map to the same p as a full run).
    `noise`: 1 − t / T_train, independent of the step count and spacing. Transformers that receive timestep / 1000
    (FLUX) are matched on the scheduler's scale too.
    """

    def __init__(self, scheduler, axis: str = AXIS_PROGRESS) -> None:
        if axis not in AXES:
            raise ValueError(f"unknown time axis {axis!r}")
        self.scheduler, self.axis = scheduler, axis
        self.train_steps = float(getattr(scheduler, "config", {}).get("num_train_timesteps", 1000))
        self._source = None
        self._values: list[float] = []

    def _distinct(self) -> list[float]:
        timesteps = self.scheduler.timesteps
        if timesteps is not self._source:
            values = [float(t) for t in timesteps]
            self._values = [t for i, t in enumerate(values) if i == 0 or t != values[i - 1]]
            self._source = timesteps
        return self._values

    def timestep(self, timestep) -> float:
        """The call's timestep on the scheduler's scale."""
        values = self._distinct()
        if not values:
            raise RuntimeError("the scheduler has no timesteps set; call the pipeline, not the denoiser alone")
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if max(values) > 1.5 >= t:  # t / 1000 (FLUX), or simply a late timestep such as 1: the closer one wins
            scaled = t * 1000.0
            if min(abs(v - scaled) for v in values) < min(abs(v - t) for v in values):
                return scaled
        return t

    def progress(self, t: float) -> float:
        values = self._distinct()
        return min((abs(v - t), i) for i, v in enumerate(values))[1] / len(values)

    def noise(self, t: float) -> float:
        return min(max(1.0 - t / self.train_steps, 0.0), 1.0)

    def __call__(self, timestep) -> float:
        t = self.timestep(timestep)
        return self.progress(t) if self.axis == AXIS_PROGRESS else self.noise(t)


class _FusedWeight:
    """A layer whose active delta lives inside its weight; `write(source)` re-merges from the original.

    The exact original is kept on the weight's device for switching layers (re-merged during denoising) and
    on the CPU for the others (only needed by `detach`). A write is one fused `addmm` per active source.
    """

    def __init__(self, module: torch.nn.Module, factors: dict, keep_on_device: bool) -> None:
        module = getattr(module, "base_layer", module)  # a layer the user already wrapped with PEFT
        self.weight = module.weight
        device, dtype = self.weight.device, self.weight.dtype
        self.factors = {source: (down.flatten(1).to(device, dtype), up.flatten(1).to(device, dtype))
                        for source, (down, up) in factors.items()}
        self.original = self.weight.detach().clone() if keep_on_device else self.weight.detach().to("cpu", copy=True)

    def write(self, source: str) -> None:
        weight = self.weight.data.view(self.weight.shape[0], -1)
        original = self.original.to(weight.device).view_as(weight)
        with torch.no_grad():
            first, *rest = _ACTIVE[source]
            down, up = self.factors[first]
            torch.addmm(original, up, down, out=weight)
            for part in rest:
                down, up = self.factors[part]
                weight.addmm_(up, down)

    def restore(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.original)


def _set_active_adapter(layer, source: str) -> None:
    others = [name for name in layer.active_adapters if name not in ADAPTERS.values()]
    layer.set_adapter(others + [ADAPTERS[s] for s in _ACTIVE[source]], inference_mode=True)


class _Track:
    """One switching layer: its phase starts and sources, how to write a source, and what it runs now."""

    __slots__ = ("write", "starts", "sources", "current")

    def __init__(self, write, phases) -> None:
        self.write = write
        self.starts = [start for start, _ in phases]
        self.sources = [source for _, source in phases]
        self.current = None

    def source_at(self, p: float) -> str:
        return self.sources[bisect.bisect_right(self.starts, p) - 1]


class ReplayHandle:
    """What `attach` returns: the installed schedule; `detach()` gives the pipeline back as it was."""

    def __init__(self, pipe, scheduled: fileformat.ScheduledFile, schedule: Schedule, mode: str) -> None:
        self.pipe, self.file, self.schedule, self.mode = pipe, scheduled, schedule, mode
        self.previous_adapters = list(pipe.get_active_adapters()) if hasattr(pipe, "get_active_adapters") else []
        self._fused: list[_FusedWeight] = []
        if mode == "fused":
            factors = source_factors(scheduled)
        else:
            self._load_adapters(scheduled)
        prefix = denoiser_name(pipe) + "."
        self.tracks: list[_Track] = []
        for name, phases in schedule.layers.items():
            component, _, path = name.partition(".")
            layer = getattr(pipe, component).get_submodule(path)
            switching = name.startswith(prefix) and len(phases) > 1
            if mode == "fused":
                fused = _FusedWeight(layer, factors[name], keep_on_device=switching)
                self._fused.append(fused)
                write = fused.write
            else:
                write = partial(_set_active_adapter, layer)
            if switching:
                self.tracks.append(_Track(write, phases))
            else:
                write(phases[0][1])
        self.change_points = sorted({start for track in self.tracks for start in track.starts[1:]})
        self.clock = Clock(pipe.scheduler, schedule.axis)
        self._segment: int | None = None
        self._last_p = -1.0
        denoiser = getattr(pipe, denoiser_name(pipe))
        self._hook = denoiser.register_forward_pre_hook(self._before_denoiser, with_kwargs=True)

    def _load_adapters(self, scheduled: fileformat.ScheduledFile) -> None:
        """One PEFT adapter per source, keyed by module name in diffusers' PEFT layout (which every pipeline
        loads, whatever the file's own key format), in the denoiser's dtype (PEFT would otherwise cast
        activations up)."""
        dtype = getattr(self.pipe, denoiser_name(self.pipe)).dtype
        factors = source_factors(scheduled)
        loaded = []
        with collected_loading_messages() as messages:
            for source in SOURCES:
                state_dict = {}
                for name, parts in factors.items():
                    if source in parts:
                        down, up = parts[source]
                        state_dict[f"{name}.lora_A.weight"] = down.to(dtype)
                        state_dict[f"{name}.lora_B.weight"] = up.to(dtype)
                if state_dict:
                    self.pipe.load_lora_weights(state_dict, adapter_name=ADAPTERS[source])
                    loaded.append(ADAPTERS[source])
        problems = key_problems(messages)
        if problems:
            self._delete_adapters()
            raise fileformat.FormatError(f"{scheduled.path}: does not fit this pipeline ({problems[0][:240]})")
        self.pipe.set_adapters(self.previous_adapters + loaded)

    def _before_denoiser(self, module, args, kwargs):
        p = self.clock(kwargs["timestep"] if "timestep" in kwargs else args[1])
        if p < self._last_p:  # a new pipeline call: the user may have changed adapters in between
            self._segment = None
            for track in self.tracks:
                track.current = None
        self._last_p = p
        self.apply(p)

    def apply(self, p: float) -> None:
        """Write the layers whose source at p differs from what they run now."""
        segment = bisect.bisect_right(self.change_points, p)
        if segment == self._segment:
            return
        self._segment = segment
        for track in self.tracks:
            source = track.source_at(p)
            if source != track.current:
                track.write(source)
                track.current = source

    def _delete_adapters(self) -> None:
        loaded = {name for names in self.pipe.get_list_adapters().values() for name in names}
        with collected_loading_messages():
            self.pipe.delete_adapters([name for name in ADAPTERS.values() if name in loaded])

    def detach(self) -> None:
        self._hook.remove()
        for fused in self._fused:
            fused.restore()
        self._fused.clear()
        if self.mode == "unfused" and self.previous_adapters:
            self._delete_adapters()
            self.pipe.set_adapters(self.previous_adapters)
        elif self.mode == "unfused":  # ours were the only adapters: take the PEFT wrappers out too
            self.pipe.unload_lora_weights()


def attach(pipe, path, mode: str = "fused") -> ReplayHandle:
    """Load a scheduled LoRA file into `pipe` and replay its schedule on every later `pipe(...)` call."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    scheduled = fileformat.read(path, with_tensors=True)
    schedule = Schedule.from_json(scheduled.schedule_json)
    if schedule.axis not in AXES:
        raise fileformat.FormatError(f"{path}: schedule axis {schedule.axis!r} is not supported by this hook")
    return ReplayHandle(pipe, scheduled, schedule, mode)
