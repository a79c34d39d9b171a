"""Replaying a lorasched file in Forge: the `<lora:NAME:S>` Forge loaded, with its denoiser part scheduled.

Forge's LoRA extension loads the file as a plain LoRA: one static patch list per weight in the UNet patcher's
`lora_patches`, merged into the weights by `LoraLoader.refresh` when the model is loaded for sampling (or, in online
mode, merged at every forward by `operations.get_weight_and_bias`). This module swaps that file's UNet entry for
scheduled patches and adds a clock; the text-encoder part stays Forge's static patch (the encoders run once per
prompt, with every source that adapts them).

- `ScheduledWeight` is a patch of Forge's patch-calculator registry (`lora.extra_weight_calculators["lorasched"]`):
  wherever Forge applies the patch list it adds the sum of the active sources' deltas with the arithmetic of
  Forge's own "lora" patch, so a full refresh, an online merge and a rewrite all give the schedule's weights.
- `Clock` is a conditioning modifier of the UNet patcher (once per model evaluation, before its cond and uncond
  batches): it maps the evaluation's sigma onto the schedule's time axis and, at a switch point, rewrites only the
  weights whose sources change, from `LoraLoader.backup` (Forge's exact copy of each original) with the per-key
  arithmetic of `refresh` — never a full re-merge. Online-mode weights need no write: the patch is read per forward.

The Script calls `process_batch(p)` and `process_before_every_sampling(p)` in its hooks of those names.
"""

from __future__ import annotations

import bisect
import itertools
import os
import weakref

import k_diffusion.sampling
import torch
from backend import memory_management, utils
from backend.modules.k_prediction import Prediction
from backend.patcher import lora as forge_lora

from .library import warn
from .runs import cut
from .schema import FormatError, Layer, Selection, is_scheduled as has_schedule, read

PATCH_TYPE = "lorasched"
QUANTIZED = ("nf4", "fp4", "gguf")  # storage Forge re-quantises on merge: scheduled patches go online there
# Samplers whose extra evaluation inside step n can sit at the next step's sigma (Heun's corrector, Heun++'s
# look-aheads, the ancestral midpoint at eta = 1): from sigmas alone it reads as the start of step n + 1.
LOOKAHEAD_SAMPLERS = tuple(getattr(k_diffusion.sampling, f"sample_{name}") for name in (
    "heun", "heunpp2", "dpm_2_ancestral", "dpmpp_2s_ancestral"))
SIGMA_TOLERANCE = 1e-6  # relative: a sampler's sigma equals the schedule's entry up to float noise
CACHED_FILES = 8  # replays kept per model (their `active` state mirrors that model's weights)

Identifier = tuple  # Forge's lora_patches key: (filename, strength_patch, strength_model, online_mode)


class ScheduledWeight:
    """One model weight's patch: the sum of its module's active sources (none: the weight as it is)."""

    def __init__(self, key: str, module: Layer) -> None:
        self.key = key  # the model parameter it patches
        self.module = module
        self.active: Selection = module.phases[0][1]

    def apply(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """Forge's "lora" patch arithmetic (alpha 1, no mid or DoRA) for each active source, in place: Forge
        narrows `weight` to a fused slice and keeps the view, so the sum must land in it."""
        for source in self.active:
            down, up = self.module.factors[source]
            up = memory_management.cast_to_device(up, weight.device, weight.dtype)
            down = memory_management.cast_to_device(down, weight.device, weight.dtype)
            delta = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(weight.shape)
            weight += ((strength * 1.0) * delta).type(weight.dtype)
        return weight


def _calculate(weight: torch.Tensor, strength: float, patch: ScheduledWeight) -> torch.Tensor:
    return patch.apply(weight, strength)


forge_lora.extra_weight_calculators[PATCH_TYPE] = _calculate


class Replay:
    """A checked file resolved on one model: its patches (shared by every run on that model, so that `active` is
    what the merged weights hold) and the switch points of its layers."""

    _tokens = itertools.count(1)

    def __init__(self, path: str, axis: str, patches: dict[object, ScheduledWeight]) -> None:
        self.path, self.axis = path, axis
        self.patches = patches  # Forge patch key (model key, or (key, offset) for a fused slice) -> its patch
        self.token = next(self._tokens)  # names this patch set in Forge's loaded-LoRA hash
        self.change_points = sorted({start for patch in patches.values() for start, _ in patch.module.phases[1:]})
        self.segment = 0  # the interval between change points that `active` is set for (all patches start there)

    def identifier(self, static: Identifier, online: bool) -> Identifier:
        """Forge's lora_patches key for this patch set in place of the file's static one. Distinct per patch set:
        `LoraLoader.refresh` skips the merge when the keys are unchanged, which is right only for the same set."""
        filename, strength_patch, strength_model, _ = static
        return (f"{filename}#lorasched{self.token}", strength_patch, strength_model, online)

    def seek(self, time: float) -> set[str]:
        """Set every patch to its sources at `time`; the model keys whose sources changed."""
        segment = bisect.bisect_right(self.change_points, time)
        if segment == self.segment:
            return set()
        self.segment = segment
        changed = set()
        for patch in self.patches.values():
            selection = patch.module.selection_at(time)
            if selection != patch.active:
                patch.active = selection
                changed.add(patch.key)
        return changed


_replays: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KModel -> {file stamp: Replay or error}
_kinds: dict[tuple, bool] = {}  # file stamp -> is a lorasched file


def _stamp(path: str) -> tuple | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return path, stat.st_mtime_ns, stat.st_size


def is_scheduled(path: str) -> bool:
    """Whether a loaded LoRA file carries a lorasched schedule (header metadata only)."""
    stamp = _stamp(path)
    if stamp is None or not path.lower().endswith(".safetensors"):
        return False
    if stamp not in _kinds:
        _kinds[stamp] = has_schedule(path)
    return _kinds[stamp]


def _resolve(path: str, model) -> Replay:
    """Read and check the file, and map its denoiser layers with Forge's own key map onto `model` (a KModel)."""
    scheduled = read(path, with_tensors=True)
    key_map = forge_lora.model_lora_keys_unet(model, {})
    base = scheduled.metadata.get("ss_base_model_version", "another model")
    modules = [module for module in scheduled.layers().values() if module.is_denoiser]
    missing = [module.key for module in modules if module.key not in key_map]
    if missing:
        raise FormatError(f"{path}: {len(missing)} of {len(modules)} denoiser layers have no weight in this model "
                          f"under Forge's LoRA key map, e.g. {missing[0]}; the file is for {base}")
    parameters = dict(model.named_parameters())
    patches = {}
    for module in modules:
        target = key_map[module.key]
        key, offset = (target, None) if isinstance(target, str) else target[:2]
        weight = parameters[key]
        shape = weight.shape if offset is None else weight.narrow(*offset).shape
        for down, up in module.factors.values():
            if (up.shape[0], down[0].numel()) != (shape[0], shape[1:].numel()):
                raise FormatError(f"{path}: {module.name}: its factors make a {up.shape[0]}x{down[0].numel()} delta "
                                  f"but {key} is {tuple(shape)}; the file is for {base} of another size")
        patches[target] = ScheduledWeight(key, module)
    return Replay(path, scheduled.axis, patches)


def replay_for(path: str, model) -> Replay:
    """The file's Replay on this model, built once per file version; raises the file's FormatError."""
    cache = _replays.setdefault(model, {})
    stamp = _stamp(path)
    if stamp not in cache:
        try:
            cache[stamp] = _resolve(path, model)
        except FormatError as exc:
            cache[stamp] = exc
        while len(cache) > CACHED_FILES:
            cache.pop(next(iter(cache)))
    found = cache[stamp]
    if isinstance(found, FormatError):
        raise found
    return found


def _patchers(objects) -> list:
    """The UNet patcher and the text encoders' patcher of a ForgeObjects."""
    return [patcher for patcher in (objects.unet, getattr(objects.clip, "patcher", None)) if patcher is not None]


def _scheduled_files(objects) -> list[str]:
    """The lorasched files among the LoRAs Forge loaded onto these objects, in load order."""
    names = dict.fromkeys(identifier[0] for patcher in _patchers(objects) for identifier in patcher.lora_patches)
    return [name for name in names if is_scheduled(name)]


def _without(owner, filename: str):
    """A clone of a UNet patcher or CLIP without the patches of `filename` (the object itself if it has none)."""
    if owner is None or not any(identifier[0] == filename
                                for identifier in getattr(owner, "patcher", owner).lora_patches):
        return owner
    clone = owner.clone()
    cloned = getattr(clone, "patcher", clone)
    cloned.lora_patches = {identifier: patches for identifier, patches in cloned.lora_patches.items()
                           if identifier[0] != filename}
    return clone


def _drop(sd_model, filename: str, problem: FormatError) -> None:
    """Report a file that cannot be replayed and generate without it: its UNet and text-encoder patches leave both
    this generation's objects and the ones Forge keeps for this set of LoRAs (so it is reported once per load)."""
    warn(f"{problem}; generating without it")
    for objects in (sd_model.forge_objects, sd_model.forge_objects_after_applying_lora):
        objects.unet = _without(objects.unet, filename)
        objects.clip = _without(objects.clip, filename)


def setup() -> None:
    """Nothing to register: the patch type registers itself on import, the clock rides on each replaying UNet."""


def unload() -> None:
    """Nothing to undo: without the Script's calls every lorasched file is Forge's plain static patch."""


def process_batch(p) -> None:
    """`Script.process_batch(p, ...)`: after `<lora:…>` loaded the prompt's files and before the text encoder
    runs, check every lorasched file among them against the model; one that cannot be replayed (changed after
    export, for another architecture or size, a newer format) is reported in one console line and left out of the
    generation, text-encoder part included."""
    sd_model = p.sd_model
    for filename in _scheduled_files(sd_model.forge_objects):
        try:
            replay_for(filename, sd_model.forge_objects.unet.model)
        except FormatError as problem:
            _drop(sd_model, filename, problem)


def run_sigmas(p) -> tuple[list[float], int] | None:
    """The sigmas the coming sampler run steps through (N + 1, the last 0) and the index of its first step in the
    schedule it was cut from, from Forge's own sampler code: what `KDiffusionSampler.sample` (txt2img) or
    `sample_img2img` (img2img, the hires pass: the last t_enc + 1 steps of a schedule of `steps`) compute, so that
    an img2img run's p continues a full run's, as in reForge, A1111 and the ComfyUI node. None for samplers
    without sigmas (DDIM, PLMS, UniPC step on timesteps)."""
    sampler = p.sampler
    if not hasattr(sampler, "get_sigmas"):
        return None
    if getattr(p, "is_hr_pass", False) or getattr(p, "init_latent", None) is not None:
        steps, t_enc = cut(p)
        return sampler.get_sigmas(p, steps)[steps - t_enc - 1:].tolist(), steps - t_enc - 1
    return sampler.get_sigmas(p, p.steps).tolist(), 0


class Clock:
    """One sampler run's time: a conditioning modifier of the replaying UNet patcher (Forge calls it once per
    model evaluation, before its cond and uncond batches, with the evaluation's sigma).

    - `progress`: p = n / N, n the step of the evaluation: a step starts at its own sigma S[n], so n is the index of
      the largest S[k] >= s (in-step evaluations between S[n+1] and S[n] stay in step n); for LOOKAHEAD_SAMPLERS
      an evaluation below the previous one, right after one at a step's own sigma, stays in that step.
    - `noise`: q = 1 - t / T, t = Forge's discrete timestep of the sigma (nearest training step), T the number of
      training steps, as lorasched records it in diffusers.
    """

    def __init__(self, sd_model, replays: list[Replay], sigmas: list[float], lookahead: bool, offset: int = 0) -> None:
        self.sd_model = sd_model
        self.replays = replays
        self.starts = sigmas[:-1][::-1]  # S[0..N-1] ascending, for bisect
        self.offset = offset  # the run's first step in the schedule it was cut from (img2img, the hires pass)
        self.lookahead = lookahead
        self.step = 0
        self.last: tuple[float, bool] | None = None  # the previous evaluation: sigma, at a step's own sigma?

    def __deepcopy__(self, memo) -> Clock:
        return self  # UNet patcher clones deep-copy model_options; the clock must stay the one its patches follow

    def __call__(self, model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        progress = self.progress(float(timestep.reshape(-1)[0]))
        self.seek(self.sd_model.forge_objects.unet, progress, timestep)
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    def start(self, patcher) -> None:
        """Before the run: set the patches to the sources of its first step, so that the merge Forge does when it
        loads `patcher` (a new set of LoRAs) already has them; rewritten here only if the merged weights are
        already this patch set's (Forge then skips its merge), instead of at the first evaluation."""
        self.seek(patcher, 0.0, torch.tensor([self.starts[-1]]))

    def seek(self, patcher, progress: float, timestep: torch.Tensor) -> None:
        changed = set()
        for replay in self.replays:
            changed |= replay.seek(progress if replay.axis == "progress" else self.noise(patcher.model.predictor,
                                                                                         timestep))
        if changed:
            rewrite(patcher, changed)

    def progress(self, sigma: float) -> float:
        at_or_above = len(self.starts) - bisect.bisect_left(self.starts, sigma * (1 - SIGMA_TOLERANCE))
        index = max(at_or_above - 1, 0)
        own = at_or_above > 0 and self.starts[-1 - index] <= sigma * (1 + SIGMA_TOLERANCE)
        look_ahead = (self.lookahead and self.last is not None and self.last[1]
                      and sigma < self.last[0] * (1 - SIGMA_TOLERANCE))
        if not look_ahead:
            self.step = index
        self.last = (sigma, own)
        return (self.offset + self.step) / (self.offset + len(self.starts))

    @staticmethod
    def noise(predictor, timestep: torch.Tensor) -> float:
        t = float(predictor.timestep(timestep.reshape(-1)[:1].float())[0])
        return min(max(1.0 - t / len(predictor.sigmas), 0.0), 1.0)


@torch.inference_mode()
def rewrite(patcher, keys: set[str]) -> None:
    """Recompute each changed weight as `LoraLoader.refresh` does (its original from Forge's backup, every offline
    patch of that key in `lora_patches` order, float32, on the parameter's device), and nothing else.

    Skipped when the merged weights are not this patcher's (Forge merges them, with the current sources, when it
    loads it), and for weights without a backup (online mode: Forge merges the patch at every forward)."""
    loader = patcher.lora_loader
    if loader.loaded_hash != str(list(patcher.lora_patches.keys())):
        return
    for key in sorted(keys):
        backup = loader.backup.get(key)
        if backup is None:
            continue
        patches = [patch for identifier, by_key in patcher.lora_patches.items() if not identifier[3]
                   for patch in by_key.get(key, [])]
        current = utils.get_attr(patcher.model, key)
        merged = forge_lora.merge_lora_to_weight(patches, backup.to(device=current.device), key,
                                                 computation_dtype=torch.float32)
        utils.set_attr_raw(patcher.model, key, torch.nn.Parameter(merged, requires_grad=False))


def _replay_checked(filename: str, unet) -> Replay:
    replay = replay_for(filename, unet.model)
    if replay.axis == "noise" and type(unet.model.predictor).timestep is not Prediction.timestep:
        raise FormatError(f"{filename}: a calibrated (noise-axis) schedule needs a model with discrete timesteps "
                          "(SD1.x, SDXL)")
    return replay


def process_before_every_sampling(p) -> list[str]:
    """`Script.process_before_every_sampling(p, ...)`: replace the static UNet patches of every lorasched file
    Forge loaded for this sampling with scheduled ones, and add the clock. Returns the files replayed.

    The replaying UNet is a clone set as `p.sd_model.forge_objects.unet`; the objects Forge keeps for the LoRA set
    keep the static patches, so a generation without this call is a plain load of the file."""
    sd_model = p.sd_model
    scheduled: dict[Identifier, tuple[Replay, Identifier]] = {}
    for filename in _scheduled_files(sd_model.forge_objects):
        try:
            replay = _replay_checked(filename, sd_model.forge_objects.unet)
        except FormatError as problem:
            _drop(sd_model, filename, problem)
            continue
        unet = sd_model.forge_objects.unet
        online = unet.model.storage_dtype in QUANTIZED
        for identifier in unet.lora_patches:
            if identifier[0] == filename:
                scheduled[identifier] = replay, replay.identifier(identifier, online or identifier[3])
    run = run_sigmas(p) if scheduled else None
    if run is None:
        for identifier in scheduled:
            warn(f"{os.path.basename(identifier[0])}: sampler {getattr(p, 'sampler_name', '?')} does not step on "
                 "sigmas; the file plays as its static mix (a plain LoRA) this time")
        return []
    unet = sd_model.forge_objects.unet
    clone = unet.clone()
    for replay, (filename, strength_patch, strength_model, online) in scheduled.values():
        patches = {key: (PATCH_TYPE, patch) for key, patch in replay.patches.items()}
        clone.add_patches(filename=filename, patches=patches, strength_patch=strength_patch,
                          strength_model=strength_model, online_mode=online)
    patches = clone.lora_patches
    order = [scheduled[identifier][1] if identifier in scheduled else identifier for identifier in unet.lora_patches]
    clone.lora_patches = {identifier: patches[identifier] for identifier in order}
    replays = list({id(replay): replay for replay, _ in scheduled.values()}.values())
    lookahead = getattr(p.sampler, "func", None) in LOOKAHEAD_SAMPLERS
    sigmas, offset = run
    clock = Clock(sd_model, replays, sigmas, lookahead, offset)
    clock.start(clone)
    clone.add_conditioning_modifier(clock)
    sd_model.forge_objects.unet = clone
    return [replay.path for replay in replays]
