"""The ComfyUI node's clock: where each model evaluation sits on the schedule, read from the sampler's sigmas.

The patches and the writes at a switch are patching.py's, shared with the WebUI extension's reForge host; here
ComfyUI's modules are handed to them (`HOST`, `ScheduledLoRA`). `Replay` is the clock: a `SAMPLER_SAMPLE` wrapper
notes which sampler runs, a `PREDICT_NOISE` wrapper (once per model evaluation, before its cond and uncond calls)
maps the evaluation's sigma onto the schedule's axis and lets the `Switcher` flip the switching patches when a
change point is crossed. A run is placed within the whole schedule it was cut from (`place_of_run`), so a run split
over samplers replays as one.
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

from .patching import Host, Switcher, noise_levels, patch_class

HOST = Host(float=comfy.float, lora=comfy.lora, model_management=comfy.model_management,
            model_patcher=comfy.model_patcher, model_sampling=comfy.model_sampling, utils=comfy.utils)
ScheduledLoRA = patch_class(WeightAdapterBase)

# Samplers whose extra evaluations inside step n can land on the next step's sigma S[n+1] (Heun's corrector, Heun++'s
# look-aheads at S[n+1] and S[n+2], and the ancestral midpoint sqrt(S[n] * sigma_down), which is S[n+1] at eta = 1),
# while a first-order sampler evaluates S[n+1] to start step n+1: from sigmas alone the two are the same call.
LOOKAHEAD_SAMPLERS = tuple(getattr(comfy.k_diffusion.sampling, f"sample_{name}") for name in (
    "heun", "heunpp2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp"))
SIGMA_TOLERANCE = 1e-6  # relative: a sampler's sigma equals the schedule's entry up to float noise
SEARCH_FACTOR = 5  # a run of n steps is looked for in schedules of up to 5·n + 50 steps (img2img down to denoise 0.2)
SEARCH_EXTRA = 50


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


class Replay(Switcher):
    """The clock of one node's patches. ComfyUI samples one run at a time, so per-run state lives here.

    Time of a model evaluation at sigma s, with S = sample_sigmas (N + 1 entries, the last 0):
    - `progress`: p = n / N, n the step the evaluation belongs to. A step starts with an evaluation at its own
      sigma S[n], so n is the index of the largest S[k] >= s; that also keeps in-step evaluations between S[n+1]
      and S[n] (dpm_2, dpmpp_sde, seeds) in step n. For LOOKAHEAD_SAMPLERS an evaluation stays in the previous
      one's step when its sigma is lower and the previous one was at a step's own sigma (the look-ahead after it).
    - `noise`: q = 1 - t / T from the model's own timestep t of s (`patching.train_timesteps`), per evaluation.
    """

    def __init__(self, path: str, axis: str, patches: list) -> None:
        super().__init__(HOST, path, axis, patches)
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
                time = noise_levels(HOST, self.path, timestep.reshape(-1)[:1], guider.inner_model.model_sampling)[0]
        self.advance(guider.model_patcher, time)
        return executor(x, timestep, model_options, seed)

    def _read_sigmas(self, sample_sigmas: torch.Tensor, model_sampling) -> None:
        """Once per run: the steps' sigmas, and on the noise axis their noise levels (one vectorised call)."""
        self._sigmas_tensor = sample_sigmas
        starts = sample_sigmas[:-1]
        self._starts = starts.tolist()[::-1]
        if self.axis == "progress":
            self._place = place_of_run(tuple(sample_sigmas.float().tolist()), model_sampling)
        if self.axis == "noise":
            self._noise = dict(zip(starts.tolist(), noise_levels(HOST, self.path, starts, model_sampling)))

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
