"""Replaying a schedule with ComfyUI's own machinery: one weight patch per layer, a clock in two wrappers.

- `ScheduledLoRA` is a weight patch (a `WeightAdapterBase`, added with `ModelPatcher.add_patches`) whose delta is
  the sum of its layer's active sources (any number of them, or none), computed by ComfyUI's own `LoRAAdapter`s.
  ComfyUI applies it wherever it applies a LoRA: into the weight when it loads the model, or at every call for
  layers it leaves in low-VRAM mode (`LowVramPatch` calls `comfy.lora.calculate_weight` on the patch list each
  time), so both follow the schedule.
- `Replay` is the clock: a `SAMPLER_SAMPLE` wrapper notes which sampler runs, a `PREDICT_NOISE` wrapper (once per
  model evaluation, before its cond and uncond calls) maps the evaluation's sigma onto the schedule's axis and,
  when a switch point is crossed, flips the switching patches and rewrites only the weights whose sources changed,
  from ComfyUI's own exact backup of the original (`rewrite`).

Newer ComfyUI's dynamic VRAM (`ModelPatcherDynamic`) applies patches at every weight cast, from copies of each
patch rebuilt as `type(patch)(loaded_keys, weights)`, and keeps a patched copy in VRAM between casts: the patch is
built that way with its live state shared by every copy, and a switch clears the cached copy (`forget_cast`)
instead of writing in place. Nothing relies on an in-place write a cast-time path would bypass.
"""

from __future__ import annotations

import bisect
import functools
import logging

import comfy.float
import comfy.k_diffusion.sampling
import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.samplers
import comfy.utils
import torch
from comfy.weight_adapter.base import WeightAdapterBase

from .schema import FormatError, Layer, Selection

# Samplers whose extra evaluations inside step n can land on the next step's sigma S[n+1] (Heun's corrector, Heun++'s
# look-aheads at S[n+1] and S[n+2], and the ancestral midpoint sqrt(S[n] * sigma_down), which is S[n+1] at eta = 1),
# while a first-order sampler evaluates S[n+1] to start step n+1: from sigmas alone the two are the same call.
LOOKAHEAD_SAMPLERS = tuple(getattr(comfy.k_diffusion.sampling, f"sample_{name}") for name in (
    "heun", "heunpp2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp"))
SIGMA_TOLERANCE = 1e-6  # relative: a sampler's sigma equals the schedule's entry up to float noise
SEARCH_FACTOR = 5  # a run of n steps is looked for in schedules of up to 5·n + 50 steps (img2img down to denoise 0.2)
SEARCH_EXTRA = 50


class PatchState:
    """What a layer's patch shares with every copy ComfyUI makes of it: the weight it patches, its schedule, the
    order of its sources, and the sources active now (set by the clock)."""

    def __init__(self, key: str, module: Layer, order: Selection) -> None:
        self.key = key  # the model weight it patches (several modules share one in FLUX's fused qkv)
        self.module = module
        self.order = order
        self.active: Selection = module.phases[0][1]


class ScheduledLoRA(WeightAdapterBase):
    """A weight patch that adds its module's active sources (none: the weight as it is).

    Built as ComfyUI builds its own adapters, `(loaded_keys, weights)`, with `weights` = (the shared PatchState,
    then one LoRAAdapter per source in its order): newer ComfyUI's cast-time patcher (ModelPatcherDynamic) rebuilds
    each patch as `type(patch)(patch.loaded_keys, <weights moved to the device>)`, and the copy must still read
    the live `active`."""

    name = "lorasched"

    def __init__(self, loaded_keys: set[str], weights: tuple) -> None:
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def build(cls, key: str, module: Layer, sources: dict[int, WeightAdapterBase]) -> ScheduledLoRA:
        """`sources`: ComfyUI LoRAAdapters by source index, c_k already divided out."""
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


def rewrite(patcher, key: str) -> bool:
    """Recompute one patched weight from ComfyUI's backup of its original, exactly as
    `ModelPatcher.patch_weight_to_device` does at load (same arithmetic, same rounding seed), so a switched weight
    is bitwise what a fresh load with the new sources would give: nothing accumulates in fp16/bf16.

    A weight with no backup is not patched in place: ComfyUI left its layer in low-VRAM mode, where `LowVramPatch`
    recomputes the patches (with the current sources) at every call. Returns whether it wrote.
    """
    backup = patcher.backup.get(key)
    if backup is None:
        return False
    if hasattr(comfy.utils.get_attr(patcher.model, key.rsplit(".", 1)[0]), "_v"):
        return False  # a dynamic-VRAM page: patched at cast time (see `forget_cast`), the backup is not its source
    weight, set_func, convert_func = comfy.model_patcher.get_key_weight(patcher.model, key)
    temp = comfy.model_management.cast_to_device(backup.weight, weight.device, torch.float32, copy=True)
    if convert_func is not None:
        temp = convert_func(temp, inplace=True)
    out = comfy.lora.calculate_weight(patcher.patches[key], temp, key)
    seed = _rounding_seed(key)
    if set_func is None:
        comfy.utils.copy_to_param(patcher.model, key, comfy.float.stochastic_rounding(out, weight.dtype, seed=seed))
    else:
        set_func(out, inplace_update=True, seed=seed)
    return True


def forget_cast(patcher, key: str) -> bool:
    """Newer ComfyUI's dynamic VRAM keeps a layer's patched weight in a VRAM page between casts and patches again
    only when the page's signature is cleared (what its own `set_dirty` does); clear it for a switched weight so
    the next cast applies the new sources. A no-op on the classic patcher. Returns whether it cleared one."""
    if not getattr(patcher, "is_dynamic", lambda: False)():
        return False
    module = comfy.utils.get_attr(patcher.model, key.rsplit(".", 1)[0])
    if not hasattr(module, "_v"):
        return False
    module._v_signature = None
    return True


@functools.cache
def _rounding_seed(key: str) -> int:
    """ComfyUI's rounding seed of a weight: a CRC in pure Python (~0.1 ms), so computed once per weight."""
    return comfy.model_patcher.string_to_seed(key)


def train_timesteps(path: str, model_sampling) -> float:
    """T such that q = 1 - t / T for ComfyUI's t = model_sampling.timestep(sigma) equals lorasched's noise axis
    q = 1 - t_diffusers / T_train: discrete (SD1.x, SDXL) t is the training-step index and T the number of
    training steps; flow (SD3) t = sigma * multiplier; FLUX t = sigma (diffusers' FLUX t / 1000 is sigma too).
    Other samplings (EDM, LCM-distilled, cascade) have no such reading: the file `path` is refused on them."""
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingFlux):
        return 1.0
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscreteFlow):
        return float(model_sampling.multiplier)
    if type(model_sampling).timestep is comfy.model_sampling.ModelSamplingDiscrete.timestep:
        return float(len(model_sampling.sigmas))
    kinds = ", ".join(base.__name__ for base in type(model_sampling).__bases__)
    raise FormatError(f"{path}: a calibrated (noise-axis) schedule cannot be read on {kinds} sampling; use the model with "
                      "discrete (SD1.x/SDXL), flow (SD3) or FLUX sampling")


# Schedulers in the order a piece of a run is matched against them: where two give the same first sigmas (the first
# 13 of sgm_uniform at 19 steps are normal's at 20), the more common one is taken.
SCHEDULER_PREFERENCE = ("normal", "karras", "simple", "exponential", "sgm_uniform", "beta", "ddim_uniform",
                        "linear_quadratic", "kl_optimal")


def _schedules(model_sampling, name: str, total: int):
    """ComfyUI's sigma schedule `name` of `total` steps, also as the samplers that discard the penultimate sigma
    (dpm_2, uni_pc) run it."""
    full = comfy.samplers.calculate_sigmas(model_sampling, name, total).float().cpu()
    yield full
    if total > 1:
        yield torch.cat([full[:-2], full[-1:]])


def _cut_from(run: torch.Tensor, full: torch.Tensor) -> int | None:
    """Where `run` starts in `full` when it is a contiguous piece of it (its last sigma may be a forced 0)."""
    steps = len(run) - 1
    offset = int(torch.argmin((full[:-1] - run[0]).abs()))
    piece = full[offset : offset + steps + 1]
    if len(piece) != steps + 1 or not torch.allclose(piece[:-1], run[:-1], rtol=1e-5, atol=0.0):
        return None
    return offset if run[-1] == 0 or torch.isclose(piece[-1], run[-1], rtol=1e-5, atol=0.0) else None


@functools.lru_cache(maxsize=64)
def place_of_run(sigmas: tuple[float, ...], model_sampling) -> tuple[int, int]:
    """(offset, total): the run's first step is step `offset` of a `total`-step schedule it was cut from.

    A run is a piece of a longer schedule when KSamplerAdvanced (or SplitSigmas) splits sampling between samplers
    or models, and when img2img denoises less than 1 (ComfyUI takes the last steps of a longer schedule). The
    progress axis is p = n / N of the whole schedule, so the pieces replay as one unsplit run. The place is found by
    recognising the run within ComfyUI's own schedules: first as a whole schedule of its length (any scheduler),
    then as a piece of a longer one (schedulers in SCHEDULER_PREFERENCE order, shortest first); a run that is no
    piece of one (custom sigmas) is its own schedule."""
    run = torch.tensor(sigmas)
    steps = len(sigmas) - 1
    names = [name for name in SCHEDULER_PREFERENCE if name in comfy.samplers.SCHEDULER_NAMES]
    names += [name for name in comfy.samplers.SCHEDULER_NAMES if name not in names]
    lengths = range(steps + 1, SEARCH_FACTOR * steps + SEARCH_EXTRA + 1)
    for name, totals in [(name, [steps]) for name in names] + [(name, lengths) for name in names]:
        for total in totals:
            for full in _schedules(model_sampling, name, total):
                offset = _cut_from(run, full)
                if offset is not None:
                    return offset, len(full) - 1
    logging.info("lorasched: a run of %d steps is no piece of a ComfyUI schedule; replaying it as its own", steps)
    return 0, steps


def noise_levels(path: str, sigmas: torch.Tensor, model_sampling) -> list[float]:
    """q = 1 - t / T of each sigma, t the model's own timestep."""
    total = train_timesteps(path, model_sampling)
    return [min(max(1.0 - t / total, 0.0), 1.0) for t in model_sampling.timestep(sigmas).reshape(-1).tolist()]


class Replay:
    """The clock and writer of one node's patches. ComfyUI samples one run at a time, so per-run state lives here.

    Time of a model evaluation at sigma s, with S = sample_sigmas (N + 1 entries, the last 0):
    - `progress`: p = n / N, n the step the evaluation belongs to. A step starts with an evaluation at its own
      sigma S[n], so n is the index of the largest S[k] >= s; that also keeps in-step evaluations between S[n+1]
      and S[n] (dpm_2, dpmpp_sde, seeds) in step n. For LOOKAHEAD_SAMPLERS an evaluation stays in the previous
      one's step when its sigma is lower and the previous one was at a step's own sigma (the look-ahead after it).
    - `noise`: q = 1 - t / T from the model's own timestep t of s (see `train_timesteps`), per evaluation.
    """

    def __init__(self, path: str, axis: str, patches: list[ScheduledLoRA]) -> None:
        self.path, self.axis = path, axis
        self.patches = patches
        self.change_points = sorted({start for patch in patches for start, _ in patch.module.phases[1:]})
        self.segment = 0  # index of the interval between change points the patches are set for (all start there)
        self.lookahead_sampler = False
        self.step = 0
        self.last: tuple[float, bool] | None = None  # the previous evaluation of this run: sigma, at a step's own?
        self._sigmas_tensor = None
        self._starts: list[float] = []  # S[0..N-1] in ascending order, for bisect
        self._place = (0, 0)  # the run's first step and the length of the schedule it was cut from
        self._noise: dict[float, float] = {}  # noise axis: S[n] -> q

    def sampler_sample(self, executor, *args, **kwargs):
        """SAMPLER_SAMPLE wrapper: a new run; note whether its sampler looks ahead to the next step's sigma."""
        self.lookahead_sampler = getattr(executor.class_obj, "sampler_function", None) in LOOKAHEAD_SAMPLERS
        self.last = None
        return executor(*args, **kwargs)

    def predict_noise(self, executor, x, timestep, model_options, seed):
        """PREDICT_NOISE wrapper: bring the weights to this evaluation's time, then evaluate (cond and uncond)."""
        guider = executor.class_obj
        sigma = float(timestep.reshape(-1)[0])
        sample_sigmas = model_options["transformer_options"]["sample_sigmas"]
        if sample_sigmas is not self._sigmas_tensor:
            self._read_sigmas(sample_sigmas, guider.inner_model.model_sampling)
        if self.axis == "progress":
            time = self.progress(sigma)
        else:
            time = self._noise.get(sigma)
            if time is None:  # an in-step evaluation between the run's sigmas
                time = noise_levels(self.path, timestep.reshape(-1)[:1], guider.inner_model.model_sampling)[0]
        segment = bisect.bisect_right(self.change_points, time)
        if segment != self.segment:
            self.switch(guider.model_patcher, time)
            self.segment = segment
        return executor(x, timestep, model_options, seed)

    def _read_sigmas(self, sample_sigmas: torch.Tensor, model_sampling) -> None:
        """Once per run: the steps' sigmas, and on the noise axis their noise levels (one vectorised call)."""
        self._sigmas_tensor = sample_sigmas
        starts = sample_sigmas[:-1]
        self._starts = starts.tolist()[::-1]
        if self.axis == "progress":
            self._place = place_of_run(tuple(sample_sigmas.float().tolist()), model_sampling)
        if self.axis == "noise":
            self._noise = dict(zip(starts.tolist(), noise_levels(self.path, starts, model_sampling)))

    def progress(self, sigma: float) -> float:
        at_or_above = len(self._starts) - bisect.bisect_left(self._starts, sigma * (1 - SIGMA_TOLERANCE))
        index = max(at_or_above - 1, 0)
        own = at_or_above > 0 and self._starts[-1 - index] <= sigma * (1 + SIGMA_TOLERANCE)
        look_ahead = (self.lookahead_sampler and self.last is not None and self.last[1]
                      and sigma < self.last[0] * (1 - SIGMA_TOLERANCE))
        if not look_ahead:
            self.step = index
        self.last = (sigma, own)
        offset, total = self._place
        return (offset + self.step) / total

    def switch(self, patcher, time: float) -> None:
        """Set every switching patch to its sources at `time`; rewrite the weights of those that changed."""
        changed = set()
        for patch in self.patches:
            selection = patch.module.selection_at(time)
            if selection != patch.active:
                patch.active = selection
                changed.add(patch.key)
        written = sum(rewrite(patcher, key) for key in sorted(changed))
        forgotten = sum(forget_cast(patcher, key) for key in sorted(changed))
        logging.debug("lorasched: time %.4f, %d weights switched, %d rewritten, %d casts forgotten", time, len(changed),
                      written, forgotten)
