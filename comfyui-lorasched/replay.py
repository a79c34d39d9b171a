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


class ScheduledLoRA(WeightAdapterBase):
    """A weight patch that adds its module's active sources (none: the weight as it is); `active` is set by the
    clock."""

    name = "lorasched"

    def __init__(self, key: str, module: Layer, sources: dict[int, WeightAdapterBase]) -> None:
        self.key = key  # the model weight it patches (several modules share one in FLUX's fused qkv)
        self.module = module
        self.sources = sources  # ComfyUI LoRAAdapters by source index, c_k already divided out
        self.active: Selection = module.phases[0][1]

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        for source in self.active:
            weight = self.sources[source].calculate_weight(weight, key, strength, strength_model, offset, function,
                                                           intermediate_dtype, original_weight)
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
        return self.step / len(self._starts)

    def switch(self, patcher, time: float) -> None:
        """Set every switching patch to its sources at `time`; rewrite the weights of those that changed."""
        changed = set()
        for patch in self.patches:
            selection = patch.module.selection_at(time)
            if selection != patch.active:
                patch.active = selection
                changed.add(patch.key)
        written = sum(rewrite(patcher, key) for key in sorted(changed))
        logging.debug("lorasched: time %.4f, %d weights switched, %d rewritten", time, len(changed), written)
