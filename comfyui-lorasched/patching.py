"""Replaying a schedule on a ComfyUI-style model patcher, for every host that has one: ComfyUI itself and reForge
(whose `ldm_patched` is ComfyUI's code under other module names).

The host's modules come in as a `Host` (what ComfyUI calls `comfy.X` is `host.X`), so one source serves both: the
ComfyUI node imports this file, and `make packs` copies it verbatim into the WebUI extension
(`sd-webui-lorasched/lorasched_webui/patching.py`), where reForge's modules are handed in; a test checks the copy
equals this file. Each host adds only its clock, which differs: ComfyUI reads the sampler's sigmas (replay.py),
reForge its CFG denoiser's step count.

- `patch_class(base)`: the weight patch, a subclass of the host's `WeightAdapterBase` (its `calculate_weight` only
  calls those) that adds its layer's active sources, any number or none; wherever the host applies a LoRA (into
  the weight at load, per call for low-VRAM layers, at every cast under dynamic VRAM) it applies the schedule.
- `scheduled_patches`: one such patch per denoiser layer of a file, each source a host LoRAAdapter.
- `Switcher`: at a change point, flips the switching patches and rewrites only the weights whose sources changed,
  from the patcher's own exact backup (`rewrite`), or clears a dynamic-VRAM layer's cached cast (`forget_cast`).
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
from dataclasses import dataclass
from types import ModuleType

import torch

from .schema import FormatError, Layer, ScheduledFile, Selection


@dataclass(frozen=True)
class Host:
    """A host's copies of the ComfyUI modules this code calls."""

    float: ModuleType
    lora: ModuleType
    model_management: ModuleType
    model_patcher: ModuleType
    model_sampling: ModuleType
    utils: ModuleType


class PatchState:
    """What a layer's patch shares with every copy the host makes of it: the weight it patches, its schedule, the
    order of its sources, and the sources active now (set by the clock)."""

    def __init__(self, key: str, module: Layer, order: Selection) -> None:
        self.key = key  # the model weight it patches (several modules share one in FLUX's fused qkv)
        self.module = module
        self.order = order
        self.active: Selection = module.phases[0][1]


def patch_class(base: type) -> type:
    """`ScheduledLoRA` over the host's `WeightAdapterBase`."""

    class ScheduledLoRA(base):
        """A weight patch that adds its module's active sources (none: the weight as it is).

        Built as the host builds its own adapters, `(loaded_keys, weights)`, with `weights` = (the shared
        PatchState, then one LoRAAdapter per source in its order): newer ComfyUI's cast-time patcher
        (ModelPatcherDynamic) rebuilds each patch as `type(patch)(patch.loaded_keys, <weights moved>)`, and the
        copy must still read the live `active`."""

        name = "lorasched"

        def __init__(self, loaded_keys: set[str], weights: tuple) -> None:
            self.loaded_keys = loaded_keys
            self.weights = weights

        @classmethod
        def build(cls, key: str, module: Layer, sources: dict):
            """`sources`: the host's LoRAAdapters by source index, c_k already divided out."""
            order = tuple(sorted(sources))
            return cls(set(), (PatchState(key, module, order), *(sources[index] for index in order)))

        @property
        def state(self) -> PatchState:
            return self.weights[0]

        @property
        def key(self) -> str:
            return self.state.key

        @property
        def module(self) -> Layer:
            return self.state.module

        @property
        def active(self) -> Selection:
            return self.state.active

        @active.setter
        def active(self, selection: Selection) -> None:
            self.state.active = selection

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            state, *adapters = self.weights
            for source in state.active:
                weight = adapters[state.order.index(source)].calculate_weight(
                    weight, key, strength, strength_model, offset, function, intermediate_dtype, original_weight)
            return weight

    return ScheduledLoRA


def rewrite(host: Host, patcher, key: str) -> bool:
    """Recompute one patched weight from the patcher's backup of its original, exactly as
    `ModelPatcher.patch_weight_to_device` does at load (same arithmetic, same rounding seed), so a switched weight
    is bitwise what a fresh load with the new sources would give: nothing accumulates in fp16/bf16.

    A weight with no backup is not patched in place: the host left its layer in low-VRAM mode, where `LowVramPatch`
    recomputes the patches (with the current sources) at every call; a dynamic-VRAM page is patched at cast time
    (`forget_cast`). Returns whether it wrote."""
    backup = patcher.backup.get(key)
    if backup is None or hasattr(host.utils.get_attr(patcher.model, key.rsplit(".", 1)[0]), "_v"):
        return False
    weight, set_func, convert_func = host.model_patcher.get_key_weight(patcher.model, key)
    temp = host.model_management.cast_to_device(backup.weight, weight.device, torch.float32, copy=True)
    if convert_func is not None:
        temp = convert_func(temp, inplace=True)
    out = host.lora.calculate_weight(patcher.patches[key], temp, key)
    seed = _rounding_seed(host, key)
    if set_func is None:
        host.utils.copy_to_param(patcher.model, key, host.float.stochastic_rounding(out, weight.dtype, seed=seed))
    else:
        set_func(out, inplace_update=True, seed=seed)
    return True


def forget_cast(host: Host, patcher, key: str) -> bool:
    """Newer ComfyUI's dynamic VRAM keeps a layer's patched weight in a VRAM page between casts and patches again
    only when the page's signature is cleared (what its own `set_dirty` does): clear it for a switched weight so
    the next cast applies the new sources. A no-op on a classic patcher. Returns whether it cleared one."""
    if not getattr(patcher, "is_dynamic", lambda: False)():
        return False
    module = host.utils.get_attr(patcher.model, key.rsplit(".", 1)[0])
    if not hasattr(module, "_v"):
        return False
    module._v_signature = None
    return True


@functools.cache
def _rounding_seed(host: Host, key: str) -> int:
    """The host's rounding seed of a weight: a CRC in pure Python (~0.1 ms), so computed once per weight."""
    return host.model_patcher.string_to_seed(key)


def train_timesteps(host: Host, path: str, model_sampling) -> float:
    """T such that q = 1 - t / T for the host's t = model_sampling.timestep(sigma) equals lorasched's noise axis
    q = 1 - t_diffusers / T_train: discrete (SD1.x, SDXL) t is the training-step index and T the number of
    training steps; flow (SD3) t = sigma * multiplier; FLUX t = sigma (diffusers' FLUX t / 1000 is sigma too).
    Other samplings (EDM, LCM-distilled, cascade) have no such reading: the file `path` is refused on them."""
    if isinstance(model_sampling, host.model_sampling.ModelSamplingFlux):
        return 1.0
    if isinstance(model_sampling, host.model_sampling.ModelSamplingDiscreteFlow):
        return float(model_sampling.multiplier)
    if type(model_sampling).timestep is host.model_sampling.ModelSamplingDiscrete.timestep:
        return float(len(model_sampling.sigmas))
    kinds = ", ".join(base.__name__ for base in type(model_sampling).__bases__)
    raise FormatError(f"{path}: a calibrated (noise-axis) schedule cannot be read on {kinds} sampling; use the model "
                      "with discrete (SD1.x/SDXL), flow (SD3) or FLUX sampling")


def noise_levels(host: Host, path: str, sigmas: torch.Tensor, model_sampling) -> list[float]:
    """q = 1 - t / T of each sigma, t the model's own timestep."""
    total = train_timesteps(host, path, model_sampling)
    return [min(max(1.0 - t / total, 0.0), 1.0) for t in model_sampling.timestep(sigmas).reshape(-1).tolist()]


def weight_key(target) -> str:
    """A key-map value is a weight name, or (name, offset[, function]) for a slice of a fused weight."""
    return target if isinstance(target, str) else target[0]


def targets(host: Host, scheduled: ScheduledFile, modules: list[Layer], key_map: dict, model,
            what: str) -> dict[str, object]:
    """Each module's key-map target, after checking that every key maps and every delta fits its weight."""
    found = {module.name: key_map.get(module.key) for module in modules}
    unmapped = [module.key for module in modules if found[module.name] is None]
    architecture = scheduled.metadata.get("ss_base_model_version", "unknown")
    name = type(getattr(model, "model_config", model)).__name__
    if unmapped:
        raise FormatError(f"{scheduled.path}: {len(unmapped)} of {len(modules)} {what} layers have no weight in this "
                          f"{what} ({name}) under the LoRA key map, e.g. {', '.join(unmapped[:3])}; the file is for "
                          f"{architecture} (ss_base_model_version): use a model of that architecture")
    for module in modules:
        target = found[module.name]
        shape = list(host.utils.get_attr(model, weight_key(target)).shape)
        if not isinstance(target, str):
            dim, _, length = target[1]
            shape[dim] = length
        down, up = next(iter(module.factors.values()))
        if up.shape[0] != shape[0] or up.shape[0] * math.prod(down.shape[1:]) != math.prod(shape):
            raise FormatError(f"{scheduled.path}: {module.key} is {up.shape[0]}x{math.prod(down.shape[1:])} but the "
                              f"{what} weight {weight_key(target)} of {name} is {'x'.join(map(str, shape))}; the "
                              f"file is for a {architecture} model of another size")
    return found


def source_lora(modules: list[Layer], source: int) -> dict[str, torch.Tensor]:
    """One source's factors as a plain LoRA state dict (no alphas: scale 1) under the file's own keys."""
    lora = {}
    for module in modules:
        if source in module.factors:
            down, up = module.factors[source]
            lora[f"{module.key}.lora_down.weight"] = down
            lora[f"{module.key}.lora_up.weight"] = up
    return lora


def scheduled_patches(host: Host, patch_type: type, scheduled: ScheduledFile, layers: dict[str, Layer], model,
                      model_sampling) -> dict:
    """One `patch_type` per denoiser layer of the file, by key-map target, each source a host LoRAAdapter; a
    noise-axis file on a sampling without training steps is refused now, not at the first step."""
    modules = [module for module in layers.values() if module.is_denoiser]
    key_map = host.lora.model_lora_keys_unet(model, {})
    found = targets(host, scheduled, modules, key_map, model, "model")
    if scheduled.axis == "noise":
        train_timesteps(host, scheduled.path, model_sampling)
    adapters = {source: host.lora.load_lora(source_lora(modules, source), key_map, log_missing=False)
                for source in range(len(scheduled.sources))}
    return {found[module.name]: patch_type.build(weight_key(found[module.name]), module,
                                                 {source: adapters[source][found[module.name]]
                                                  for source in module.factors})
            for module in modules}


class Switcher:
    """The switching patches of one file and the writes when their sources change; the host's clock gives it each
    model evaluation's time on the schedule's axis (`advance`)."""

    def __init__(self, host: Host, path: str, axis: str, patches: list) -> None:
        self.host, self.path, self.axis = host, path, axis
        self.patches = patches
        self.change_points = sorted({start for patch in patches for start, _ in patch.module.phases[1:]})
        self.segment = 0  # index of the interval between change points the patches are set for (all start there)

    def advance(self, patcher, time: float) -> None:
        """Bring the patcher's weights to `time` if a change point was crossed since the last evaluation."""
        segment = bisect.bisect_right(self.change_points, time)
        if segment != self.segment:
            self.switch(patcher, time)
            self.segment = segment

    def switch(self, patcher, time: float) -> None:
        """Set every switching patch to its sources at `time`; rewrite the weights of those that changed."""
        changed = set()
        for patch in self.patches:
            selection = patch.module.selection_at(time)
            if selection != patch.active:
                patch.active = selection
                changed.add(patch.key)
        written = sum(rewrite(self.host, patcher, key) for key in sorted(changed))
        forgotten = sum(forget_cast(self.host, patcher, key) for key in sorted(changed))
        logging.debug("lorasched: time %.4f, %d weights switched, %d rewritten, %d casts forgotten", time,
                      len(changed), written, forgotten)
