"""Replaying a lorasched file inside AUTOMATIC1111's built-in Lora extension (A1111 1.10).

- Loading: `ModuleTypeScheduled`, registered first in `networks.module_types`, claims every layer A1111 matched in a
  file with lorasched metadata. Each becomes a `ScheduledModule`. A layer whose sources switch carries the sum of
  A1111's own `NetworkModuleLora` of each source active at the current time; every other layer (text encoders,
  denoiser layers with one phase, and all layers when the Script's accordion is off) carries the file's static mix,
  A1111's plain LoRA of the file's tensors. A1111 merges either into the weight from its own weights backup (or
  adds it at every call with `lora_functional`), times the prompt's strength, like any LoRA.
- Clock: `on_cfg_denoiser` runs before every model evaluation. It places the evaluation on the schedule's axis and,
  when a switch point is crossed, sets the new sources on the layers that change and re-merges only those layers with
  `networks.network_apply_weights` (restore from A1111's backup, then every loaded network's delta).
- A file that cannot be replayed (changed after export, another format version, another model) is reported in one
  console line and its modules stay inert: A1111 leaves their layers at their original weight.

The Script calls `setup()` once, `process_batch(p)` and `process_before_every_sampling(p)` (lorasched_webui/__init__).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import weakref

import network
import network_lora
import networks
import torch
from modules import script_callbacks, shared
from modules.script_callbacks import CFGDenoiserParams

from .library import warn
from .runs import progress
from .schema import KEY_VERSION, FormatError, Layer, Selection, read

FACTOR_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight")
REPLAY_FLAG = "lorasched_replay"  # set on `p` by process_before_every_sampling: this run replays the schedules
# A layer's `network_current_names` after a switch: unlike () ("original weight") it never equals the wanted
# networks, so A1111 restores the layer from its backup and re-adds every network when it next applies it.
STALE = ("lorasched: sources switched",)


class ScheduledNetwork:
    """One loaded lorasched file (one A1111 `Network`): its layers, its modules by file key, the clock's place."""

    def __init__(self, net: network.Network) -> None:
        self.path = net.network_on_disk.filename
        self.modules: dict[str, ScheduledModule] = {}
        self.problem: str | None = None
        self.checked = False
        self.switching: list[ScheduledModule] = []
        self.change_points: list[float] = []
        self.replaying = True  # False: the switching layers carry the static mix (the Script's accordion is off)
        self.segment: int | None = 0  # the interval between change points the sources are set for (None: unknown)
        try:
            scheduled = read(self.path, with_tensors=True)
        except FormatError as exc:
            self.problem = str(exc)
            self.axis, self.architecture, self.keys, self.pending, self.static = "", "", (), {}, {}
            return
        self.axis = scheduled.axis
        self.architecture = scheduled.metadata.get("ss_base_model_version", "unknown")
        # each layer's factors until its module is made (the module keeps A1111's copies of them)
        self.pending: dict[str, Layer] = {layer.key: layer for layer in scheduled.layers().values()}
        self.static = {record.key: record.static for record in scheduled.modules.values()}  # c_k of each source
        self.keys = tuple(self.pending)

    def fail(self, problem: str) -> None:
        """Note why the file cannot be replayed (the first reason found is the one reported)."""
        if self.problem is None:
            self.problem = f"{self.path}: {problem}"

    def ready(self) -> bool:
        """Whether the file replays. Checked at first use, when A1111 has matched (and handed us) every layer it
        could: a file layer without a module has no weight in this model. A problem is printed once."""
        if not self.checked:
            self.checked = True
            self.pending = {}
            missing = [key for key in self.keys if key not in self.modules]
            if missing:
                self.fail(f"{len(missing)} of {len(self.keys)} layers have no weight in this model under A1111's "
                          f"LoRA key map, e.g. {', '.join(missing[:3])}; the file is for {self.architecture} "
                          "(ss_base_model_version): use a model of that architecture")
            if self.problem is not None:
                warn(f"{self.problem}; generating without it")
            else:
                self.switching = [module for module in self.modules.values() if module.switches]
                self.change_points = sorted({start for module in self.switching
                                             for start, _ in module.layer.phases[1:]})
                # A1111 knows a layer's merged networks by name and strength only: a layer may still carry another
                # phase merged by an earlier load of this file. Have A1111 re-merge switching layers at next use.
                for module in self.switching:
                    mark_stale(current_layer(module))
        return self.problem is None

    def set_replaying(self, replaying: bool) -> list[ScheduledModule]:
        """Replay the schedule or apply the static mix; the modules whose delta that changes."""
        if replaying == self.replaying:
            return []
        self.replaying, self.segment = replaying, None
        return self.switching

    def switch(self, time: float) -> list[ScheduledModule]:
        """Set every switching module to its sources at `time`; the modules whose sources changed."""
        segment = bisect.bisect_right(self.change_points, time)
        if segment == self.segment:
            return []
        self.segment = segment
        changed = []
        for module in self.switching:
            selection = module.layer.selection_at(time)
            if selection != module.active:
                module.active = selection
                changed.append(module)
        return changed


class ScheduledModule(network.NetworkModule):
    """One layer of a lorasched file: one A1111 `NetworkModuleLora` per source that adapts it (so linear, conv and
    attention layers, dtypes and the strength are A1111's arithmetic). It carries the sum of its active sources
    (none: no change), or, for a denoiser layer whose sources switch in a run the Script does not replay, the file's
    static mix: each source times its static weight c_k, what a plain load of the file gives."""

    def __init__(self, net: network.Network, weights: network.NetworkWeights, scheduled: ScheduledNetwork,
                 layer: Layer | None) -> None:
        super().__init__(net, weights)
        self.scheduled = scheduled
        self.layer = layer if scheduled.problem is None and self._fits(layer) else None
        self.sources: dict[int, network_lora.NetworkModuleLora] = {}
        self.active: Selection = ()
        self.switches = False
        if self.layer is not None:
            self.sources = {index: network_lora.NetworkModuleLora(net, network.NetworkWeights(
                weights.network_key, weights.sd_key, {"lora_down.weight": down, "lora_up.weight": up},
                weights.sd_module)) for index, (down, up) in self.layer.factors.items()}
            self.static = scheduled.static[self.layer.key]
            self.active = self.layer.phases[0][1]
            self.switches = self.layer.is_denoiser and self.layer.switches
            self.layer = dataclasses.replace(self.layer, factors={})  # A1111's modules hold their own copies

    def _fits(self, layer: Layer) -> bool:
        """Whether the file's delta has this layer's shape (else the file is for a model of another size)."""
        down, up = next(iter(layer.factors.values()))
        rows, columns = up.shape[0], math.prod(down.shape[1:])
        if self.shape is not None and self.shape[0] == rows and math.prod(self.shape) == rows * columns:
            return True
        shape = "x".join(map(str, self.shape or ()))
        self.scheduled.fail(f"{layer.key} is {rows}x{columns} but layer {self.sd_key} of this model is {shape}; "
                            f"the file is for a {self.scheduled.architecture} model of another size")
        return False

    def mix(self) -> dict[int, float]:
        """The weight of each source this layer carries now."""
        if self.switches and not self.scheduled.replaying:
            return {index: self.static[index] for index in self.sources}
        return dict.fromkeys(self.active, 1.0)

    def calc_updown(self, orig_weight: torch.Tensor):
        if not self.scheduled.ready():
            # A1111 catches this per layer: the layer keeps its original weight, the network counts an error
            raise RuntimeError(self.scheduled.problem)
        updown = None
        for index, weight in self.mix().items():
            delta, _ = self.sources[index].calc_updown(orig_weight)
            delta = delta if weight == 1.0 else delta * weight
            updown = delta if updown is None else updown + delta
        return (torch.zeros_like(orig_weight) if updown is None else updown), None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`lora_functional` mode: A1111 adds every network's output to the layer's at each call."""
        if self.scheduled.ready():
            for index, weight in self.mix().items():
                source = self.sources[index]
                y = source.forward(x, y) if weight == 1.0 else y + source.forward(x, 0.0) * weight
        return y


_networks: weakref.WeakKeyDictionary[network.Network, ScheduledNetwork] = weakref.WeakKeyDictionary()


class ModuleTypeScheduled(network.ModuleType):
    """Claims the layers of files with lorasched metadata (any other file goes on to A1111's own module types)."""

    def create_module(self, net: network.Network, weights: network.NetworkWeights) -> ScheduledModule | None:
        if KEY_VERSION not in net.network_on_disk.metadata:
            return None
        scheduled = _networks.get(net)
        if scheduled is None:
            scheduled = _networks[net] = ScheduledNetwork(net)
        key = weights.network_key
        for suffix in FACTOR_SUFFIXES:
            key = key.removesuffix(suffix)
        layer = scheduled.pending.pop(key, None)
        if layer is None:
            scheduled.fail(f"tensor {weights.network_key} has no layer in the file's schedule")
        module = ScheduledModule(net, weights, scheduled, layer)
        scheduled.modules[key] = module
        return module


def noise_level(params: CFGDenoiserParams) -> float:
    """q = 1 - t / T of this evaluation, t the timestep A1111 gives the model: k-diffusion's `sigma_to_t` of its
    sigma on the model's discrete schedule of T training steps; timestep samplers (DDIM, PLMS, UniPC) pass t."""
    sigma = params.sigma[:1]
    schedule = params.denoiser.inner_model
    if hasattr(schedule, "sigma_to_t"):
        t, total = float(schedule.sigma_to_t(sigma)[0]), len(schedule.sigmas)
    else:
        t, total = float(sigma[0]), len(shared.sd_model.alphas_cumprod)
    return min(max(1.0 - t / total, 0.0), 1.0)


def on_cfg_denoiser(params: CFGDenoiserParams) -> None:
    """Before each model evaluation: bring every loaded lorasched file to this evaluation's time (or to its static
    mix, in a run the Script does not replay)."""
    replaying = bool(getattr(params.denoiser.p, REPLAY_FLAG, False))
    stale: dict[str, ScheduledModule] = {}
    for scheduled in _loaded():
        if not scheduled.ready() or not scheduled.switching:
            continue
        changed = scheduled.set_replaying(replaying)
        if replaying:
            if scheduled.axis == "progress":
                time = progress(params.denoiser)
            else:
                time = noise_level(params)
            changed = [*changed, *scheduled.switch(time)]
        for module in changed:
            stale[module.sd_module.network_layer_name] = module
    if stale and not shared.opts.lora_functional:  # functional mode reads the sources at every call
        with torch.no_grad():
            for module in stale.values():
                layer = current_layer(module)
                mark_stale(layer)
                networks.network_apply_weights(layer)  # A1111's restore from backup + every network's delta


def _loaded() -> list[ScheduledNetwork]:
    """The lorasched files among A1111's loaded networks."""
    return [_networks[net] for net in networks.loaded_networks if net in _networks]


def current_layer(module: ScheduledModule) -> torch.nn.Module:
    """The module's layer in the loaded model, by name, as A1111 applies networks to whichever model is loaded."""
    mapping = getattr(shared.sd_model, "network_layer_mapping", {})
    return mapping.get(module.sd_module.network_layer_name, module.sd_module)


def mark_stale(layer: torch.nn.Module) -> None:
    """Make A1111 re-merge `layer` when it next applies it; a layer at its original weight (`()`) needs nothing."""
    if getattr(layer, "network_current_names", ()) != ():
        layer.network_current_names = STALE


def setup() -> None:
    """Once, when the Script loads (the Lora extension's script has loaded `networks`): register the module type
    ahead of A1111's own (which would take the file as a plain LoRA) and the clock on `on_cfg_denoiser`.
    Idempotent, also after A1111 reloads the extension's modules."""
    networks.module_types[:] = [ModuleTypeScheduled()] + [
        kind for kind in networks.module_types if type(kind).__name__ != ModuleTypeScheduled.__name__]
    script_callbacks.remove_callbacks_for_function(on_cfg_denoiser)
    script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="lorasched")


def unload() -> None:
    """Undo `setup` (for `on_script_unloaded`): files loaded after it are plain LoRAs again."""
    networks.module_types[:] = [kind for kind in networks.module_types
                                if type(kind).__name__ != ModuleTypeScheduled.__name__]
    script_callbacks.remove_callbacks_for_function(on_cfg_denoiser)


def process_batch(p) -> None:
    """Nothing to do once `<lora:…>` has loaded the prompt's files: the module type claimed them, and a file that
    cannot be replayed is reported (and left inert) when A1111 first applies it, before any weight changes."""


def process_before_every_sampling(p) -> list[str]:
    """Before every sampling run (the hires pass too): this run replays the schedules (without this call, as with
    the Script's accordion off, lorasched files act as plain LoRAs). Returns the files replayed."""
    setattr(p, REPLAY_FLAG, True)
    return [scheduled.path for scheduled in _loaded() if scheduled.ready()]
