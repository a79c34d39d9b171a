"""Replaying a scheduled LoRA file in a diffusers pipeline: `handle = attach(pipe, path)`, `handle.detach()`.

The file's factors are split back into a subject and a style adapter and loaded with the pipeline's own
`load_lora_weights`; a forward pre-hook on the denoiser reads the `timestep` it is called with, turns it into
denoising progress through the pipeline's scheduler, and sets the active adapter of the layers whose choice
changed. Nothing is scored at inference: the per-step work is a lookup plus writes at switch points.
Import-light on purpose: torch, safetensors, json (through fileformat) and the objects it is handed.
"""

from __future__ import annotations

import bisect

import torch

from . import fileformat
from .lora import BOTH, SOURCES, STYLE, SUBJECT, denoiser_name
from .quiet import collected_loading_messages, key_problems
from .schedule import AXIS_PROGRESS, Schedule

ADAPTERS = {SUBJECT: "lorasched_subject", STYLE: "lorasched_style"}
_ACTIVE = {SUBJECT: (ADAPTERS[SUBJECT],), STYLE: (ADAPTERS[STYLE],), BOTH: (ADAPTERS[SUBJECT], ADAPTERS[STYLE])}


def split_sources(scheduled: fileformat.ScheduledFile) -> dict[str, dict[str, torch.Tensor]]:
    """Undo the export's rank concatenation: one kohya state dict per source, static weights divided out."""
    parts: dict[str, dict[str, torch.Tensor]] = {source: {} for source in SOURCES}
    tensors = scheduled.tensors
    for record in scheduled.modules.values():
        key = record["key"]
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        offset = 0
        for source, rank, weight in zip(SOURCES, record["ranks"], record["static"]):
            if rank == 0:
                continue
            part = parts[source]
            part[f"{key}.lora_down.weight"] = down[offset : offset + rank].float() / weight
            part[f"{key}.lora_up.weight"] = up[:, offset : offset + rank].float()
            offset += rank
    return parts


class Progress:
    """Denoising progress p = n / N of a denoiser call, from its timestep and the scheduler's timesteps.

    n is the position of the timestep among the scheduler's distinct timesteps (so second-order schedulers
    that call twice per step, and img2img runs that start late, map to the same p as a full run).
    Transformers that receive timestep / 1000 (FLUX) are matched on that scale too.
    """

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self._source = None
        self._values: list[float] = []

    def _distinct(self) -> list[float]:
        timesteps = self.scheduler.timesteps
        if timesteps is not self._source:
            values = [float(t) for t in timesteps]
            self._values = [t for i, t in enumerate(values) if i == 0 or t != values[i - 1]]
            self._source = timesteps
        return self._values

    def __call__(self, timestep) -> float:
        values = self._distinct()
        if not values:
            raise RuntimeError("the scheduler has no timesteps set; call the pipeline, not the denoiser alone")
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        candidates = [t, t * 1000.0] if max(values) > 1.5 >= t else [t]
        index = min((abs(v - c), i) for c in candidates for i, v in enumerate(values))[1]
        return index / len(values)


class _Track:
    """One switching layer: its phase starts and sources, and the source currently written."""

    __slots__ = ("layer", "starts", "sources", "current")

    def __init__(self, layer, phases) -> None:
        self.layer = layer
        self.starts = [start for start, _ in phases]
        self.sources = [source for _, source in phases]
        self.current = None

    def source_at(self, p: float) -> str:
        return self.sources[bisect.bisect_right(self.starts, p) - 1]


def _set_active(layer, source: str) -> None:
    others = [name for name in layer.active_adapters if name not in ADAPTERS.values()]
    layer.set_adapter(others + list(_ACTIVE[source]), inference_mode=True)


class ReplayHandle:
    """What `attach` returns: the installed schedule; `detach()` gives the pipeline back as it was."""

    def __init__(self, pipe, scheduled: fileformat.ScheduledFile, schedule: Schedule, previous: list[str]) -> None:
        self.pipe = pipe
        self.file = scheduled
        self.schedule = schedule
        denoiser = getattr(pipe, denoiser_name(pipe))
        prefix = denoiser_name(pipe) + "."
        self.previous_adapters = previous
        self.tracks: list[_Track] = []
        for name, phases in schedule.layers.items():
            if name.startswith(prefix):
                layer = denoiser.get_submodule(name[len(prefix) :])
                if len(phases) > 1:
                    self.tracks.append(_Track(layer, phases))
                else:
                    _set_active(layer, phases[0][1])
        self.change_points = sorted({start for track in self.tracks for start in track.starts[1:]})
        self.progress = Progress(pipe.scheduler)
        self._segment: int | None = None
        self._last_p = -1.0
        self._hook = denoiser.register_forward_pre_hook(self._before_denoiser, with_kwargs=True)

    def _before_denoiser(self, module, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        p = self.progress(timestep)
        if p < self._last_p:  # a new pipeline call: the user may have reset adapters in between
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
                _set_active(track.layer, source)
                track.current = source

    def detach(self) -> None:
        self._hook.remove()
        loaded = {name for names in self.pipe.get_list_adapters().values() for name in names}
        with collected_loading_messages():
            self.pipe.delete_adapters([name for name in ADAPTERS.values() if name in loaded])
        if self.previous_adapters:
            self.pipe.set_adapters(self.previous_adapters)


def attach(pipe, path) -> ReplayHandle:
    """Load a scheduled LoRA file into `pipe` and replay its schedule on every later `pipe(...)` call."""
    scheduled = fileformat.read(path, with_tensors=True)
    schedule = Schedule.from_json(scheduled.schedule_json)
    if schedule.axis != AXIS_PROGRESS:
        raise fileformat.FormatError(f"{path}: schedule axis {schedule.axis!r} is not supported by this hook")
    previous = list(pipe.get_active_adapters())
    loaded = []
    with collected_loading_messages() as messages:
        for source, state_dict in split_sources(scheduled).items():
            if state_dict:
                pipe.load_lora_weights(state_dict, adapter_name=ADAPTERS[source])
                loaded.append(ADAPTERS[source])
    if key_problems(messages):
        raise fileformat.FormatError(f"{path}: does not fit this pipeline ({key_problems(messages)[0][:240]})")
    pipe.set_adapters(previous + loaded)
    return ReplayHandle(pipe, scheduled, schedule, previous)
