"""Replaying a scheduled LoRA file in a diffusers pipeline: `with attach(pipe, path): pipe(...)`.

A forward pre-hook on the denoiser reads the `timestep` it is called with, turns it into the schedule's time
coordinate (denoising progress, or noise level for calibrated schedules; see schedule.py), and rewrites only
the layers whose source changed. Nothing is scored at inference: the per-step work is a lookup, plus writes at
switch points. Two modes:

- `fused` (default): each layer's active delta is merged into its base weight; switching layers are re-merged at
  their switch points from an exact copy of the original weight (no drift in fp16/bf16). Between switches the
  denoiser runs at the base model's own speed; weights change in place, so `torch.compile`d denoisers keep their
  graphs. `cross_attention_kwargs={"scale": s}` has no effect on fused layers.
- `unfused`: the factors are split back into one adapter per source, loaded with the pipeline's own
  `load_lora_weights`; a switch sets which adapters are active in that layer (one LoRA path per active source,
  not all of them with zero scales). Honors the LoRA scale, costs a plain unfused LoRA; switching recompiles a
  compiled denoiser.

Import-light on purpose: torch, safetensors, json (through schema, the reader every host shares: the schedule is
what replays, so the method's own params are not its to check) and the objects it is handed.
"""

from __future__ import annotations

import bisect
import weakref
from functools import partial

import torch

from . import schema
from .clock import Clock
from .errors import LoraschedError
from .lora import Selection, denoiser_name
from .names import get_module
from .quiet import collected_loading_messages, key_problems

MODES = ("fused", "unfused")
ADAPTER_PREFIX = "lorasched_"
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipeline -> its ReplayHandle


def adapter_names(roles: tuple[str, ...]) -> list[str]:
    """The PEFT adapter of each source in unfused mode: `lorasched_<role>`, numbered from the second of a role on."""
    return [f"{ADAPTER_PREFIX}{role}" + (f"_{roles[:i].count(role) + 1}" if role in roles[:i] else "")
            for i, role in enumerate(roles)]


def source_factors(scheduled: schema.ScheduledFile) -> dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Per module, per source index, (down, up) with the static weight divided out (`ScheduledFile.factors`)."""
    return {name: scheduled.factors(name) for name in scheduled.modules}


class _FusedWeight:
    """A layer whose active delta lives inside its weight; `write(source)` re-merges from the original.

    The exact original is kept on the weight's device for switching layers (re-merged during denoising) and
    on the CPU for the others (only needed by `detach`). A write is one fused `addmm` per active source (a copy of
    the original when none is).
    """

    def __init__(self, module: torch.nn.Module, factors: dict, keep_on_device: bool) -> None:
        module = getattr(module, "base_layer", module)  # a layer the user already wrapped with PEFT
        self.weight = module.weight
        device, dtype = self.weight.device, self.weight.dtype
        self.factors = {source: (down.flatten(1).to(device, dtype), up.flatten(1).to(device, dtype))
                        for source, (down, up) in factors.items()}
        self.original = self.weight.detach().clone() if keep_on_device else self.weight.detach().to("cpu", copy=True)

    def write(self, selection: Selection) -> None:
        weight = self.weight.data.view(self.weight.shape[0], -1)
        original = self.original.to(weight.device).view_as(weight)
        with torch.no_grad():
            if not selection:
                weight.copy_(original)
                return
            first, *rest = selection
            down, up = self.factors[first]
            torch.addmm(original, up, down, out=weight)
            for part in rest:
                down, up = self.factors[part]
                weight.addmm_(up, down)

    def restore(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.original)


def _set_active_adapters(layer, adapters: list[str], selection: Selection) -> None:
    others = [name for name in layer.active_adapters if name not in adapters]
    layer.set_adapter(others + [adapters[i] for i in selection], inference_mode=True)


class _Track:
    """One switching layer: its phase starts and sources, how to write a source, and what it runs now."""

    __slots__ = ("write", "starts", "selections", "current")

    def __init__(self, write, phases) -> None:
        self.write = write
        self.starts = [start for start, _ in phases]
        self.selections = [selection for _, selection in phases]
        self.current = None

    def selection_at(self, p: float) -> Selection:
        return self.selections[bisect.bisect_right(self.starts, p) - 1]


def resolve_layers(pipe, scheduled: schema.ScheduledFile) -> dict[str, torch.nn.Module]:
    """Every scheduled module of `pipe`, checked against its factors' shapes before anything is changed."""
    layers = {}
    for name, record in scheduled.modules.items():
        try:
            layer = get_module(pipe, name)
        except AttributeError:
            raise LoraschedError(f"{scheduled.path}: does not fit this pipeline (it has no module {name})") from None
        weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
        down = scheduled.tensors[f"{record.key}.lora_down.weight"]
        up = scheduled.tensors[f"{record.key}.lora_up.weight"]
        if weight is None or weight.ndim != down.ndim or up.shape[0] != weight.shape[0] or \
                down.shape[1:] != weight.shape[1:]:
            shape = None if weight is None else tuple(weight.shape)
            raise LoraschedError(f"{scheduled.path}: does not fit this pipeline ({name} has weight shape {shape}, "
                                 f"the file's factors make {(up.shape[0], *down.shape[1:])})")
        layers[name] = layer
    return layers


class ReplayHandle:
    """What `attach` returns: the installed schedule. `detach()` (or leaving a `with attach(...)` block) gives the
    pipeline back as it was, removing only what `attach` added."""

    def __init__(self, pipe, scheduled: schema.ScheduledFile, mode: str) -> None:
        self.pipe, self.file, self.schedule, self.mode = pipe, scheduled, scheduled.schedule, mode
        self.adapters = adapter_names(scheduled.roles)
        layers = resolve_layers(pipe, scheduled)
        self._fused: list[_FusedWeight] = []
        self._loaded: list[str] = []
        self._hook = None
        self.tracks: list[_Track] = []
        factors = source_factors(scheduled)
        try:
            if mode == "unfused":
                self._load_adapters(factors)
            self._install(layers, factors)
        except BaseException:
            self._undo()
            raise
        self.change_points = sorted({start for track in self.tracks for start in track.starts[1:]})
        self.clock = Clock.of(pipe, self.schedule.axis)
        self._segment: int | None = None
        self._last_p = -1.0
        denoiser = getattr(pipe, denoiser_name(pipe))
        self._hook = denoiser.register_forward_pre_hook(self._before_denoiser, with_kwargs=True)

    def _install(self, layers: dict[str, torch.nn.Module], factors: dict) -> None:
        """Write every layer's first source; keep the switching layers (denoiser, more than one phase) as tracks."""
        prefix = denoiser_name(self.pipe) + "."
        for name, phases in self.schedule.layers.items():
            switching = name.startswith(prefix) and len(phases) > 1
            if self.mode == "fused":
                fused = _FusedWeight(layers[name], factors[name], keep_on_device=switching)
                self._fused.append(fused)
                write = fused.write
            else:  # resolved again: loading the adapters wrapped the layer
                write = partial(_set_active_adapters, get_module(self.pipe, name), self.adapters)
            if switching:
                self.tracks.append(_Track(write, phases))
            else:
                write(phases[0][1])

    def _load_adapters(self, factors: dict) -> None:
        """One PEFT adapter per source, keyed by module name in diffusers' PEFT layout (which every pipeline
        loads, whatever the file's own key format), in the denoiser's dtype (PEFT would otherwise cast
        activations up)."""
        dtype = getattr(self.pipe, denoiser_name(self.pipe)).dtype
        active = self._user_adapters()
        try:
            with collected_loading_messages() as messages:
                for source, adapter in enumerate(self.adapters):
                    state_dict = {}
                    for name, parts in factors.items():
                        if source in parts:
                            down, up = parts[source]
                            state_dict[f"{name}.lora_A.weight"] = down.to(dtype)
                            state_dict[f"{name}.lora_B.weight"] = up.to(dtype)
                    if state_dict:
                        self._loaded.append(adapter)
                        self.pipe.load_lora_weights(state_dict, adapter_name=adapter)
            problems = key_problems(messages)
            if problems:
                raise LoraschedError(f"{self.file.path}: does not fit this pipeline ({problems[0][:240]})")
            self.pipe.set_adapters(active + self._loaded)
        except LoraschedError:
            raise
        except Exception as exc:  # PEFT and diffusers raise many types for factors that do not fit
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
            raise LoraschedError(f"{self.file.path}: does not fit this pipeline ({reason})") from exc

    def _user_adapters(self) -> list[str]:
        """The adapters active now that are not ours."""
        if not any(self.pipe.get_list_adapters().values()):
            return []
        return [name for name in self.pipe.get_active_adapters() if name not in self.adapters]

    def _undo(self) -> None:
        """Give back what was changed so far: original weights, and our adapters only (the user's, loaded
        before or after attach, stay active as they are). With no adapter left, PEFT's wrappers go too."""
        for fused in self._fused:
            fused.restore()
        self._fused.clear()
        if not self._loaded:
            return
        present = {name for names in self.pipe.get_list_adapters().values() for name in names}
        keep = self._user_adapters()
        with collected_loading_messages():
            self.pipe.delete_adapters([name for name in self._loaded if name in present])
            if not any(self.pipe.get_list_adapters().values()):
                self.pipe.unload_lora_weights()
            elif keep:
                self.pipe.set_adapters(keep)
        self._loaded.clear()

    def _before_denoiser(self, module, args, kwargs):
        p = self.clock(kwargs["timestep"] if "timestep" in kwargs else args[1])
        if p < self._last_p:  # a new pipeline call: the user may have changed adapters in between
            self.reset()
        self._last_p = p
        self.apply(p)

    def reset(self) -> None:
        """Forget what each layer runs now, so the next `apply` writes every switching layer again."""
        self._segment = None
        for track in self.tracks:
            track.current = None

    def apply(self, p: float) -> None:
        """Write the layers whose source at p differs from what they run now."""
        segment = bisect.bisect_right(self.change_points, p)
        if segment == self._segment:
            return
        self._segment = segment
        for track in self.tracks:
            selection = track.selection_at(p)
            if selection != track.current:
                track.write(selection)
                track.current = selection

    @property
    def attached(self) -> bool:
        return self._hook is not None

    def detach(self) -> None:
        """Remove the hook and what attach added; a second call does nothing."""
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        self._undo()

    def __enter__(self) -> ReplayHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def attach(pipe, path, mode: str = "fused") -> ReplayHandle:
    """Load a scheduled LoRA file into `pipe` and replay its schedule on every later `pipe(...)` call.

    Transactional: the file is read and checked, and every module and shape resolved, before the pipeline is
    changed; on any error the pipeline is exactly as it was and a `LoraschedError` names the file and the problem.
    Use as `with attach(pipe, path): ...` to detach on exit.
    """
    if mode not in MODES:
        raise LoraschedError(f"{path}: replay mode must be one of {', '.join(MODES)}, not {mode!r}")
    attached = _ATTACHED.get(pipe)
    if attached is not None and attached.attached:
        raise LoraschedError(f"{path}: this pipeline already replays {attached.file.path}; detach it first (two "
                             "schedules on one pipeline would rewrite each other's layers)")
    scheduled = schema.read(path, with_tensors=True)
    handle = ReplayHandle(pipe, scheduled, mode)
    _ATTACHED[pipe] = handle
    return handle
