"""The reference the node is held to: the same ComfyUI model, every step's weights set by hand from the file.

Independent of the node: the file is read by lorasched itself (`fileformat.read`, `replay.source_factors`, its
`Schedule`), ComfyUI's key map only says which weight each key patches, and each sampling step's weights are
written with plain torch as original + the schedule's active deltas (any number, or none), in the float32
arithmetic ComfyUI's LoRA patch uses (W + B·A per source, in source order), so any difference is a difference in
*which* deltas are active. lorasched reads format 1 and 2 into the same structure (sources by index).
The step of each model evaluation comes from the sampler's own structure (EVALS_PER_STEP), not from sigmas.
"""

from __future__ import annotations

import comfy.lora
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy.patcher_extension import WrappersMP
from lorasched.merge import fileformat
from lorasched.merge.replay import source_factors

# Model evaluations per step (the last step, ending at sigma 0, takes one: Euler for heun, sigma_down = 0 for the
# ancestral sampler), read off comfy/k_diffusion/sampling.py.
EVALS_PER_STEP = {"euler": 1, "heun": 2, "dpmpp_2s_ancestral": 2}


def sample(model, noise: torch.Tensor, conds: tuple[list, list], steps: int, sampler: str, cfg: float,
           scheduler: str = "normal", seed: int = 0) -> torch.Tensor:
    """ComfyUI's own sampling entry point (what the KSampler node calls)."""
    positive, negative = conds
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative,
                               torch.zeros_like(noise), seed=seed, disable_pbar=True)


class HandSetWeights:
    """Writes a model's scheduled weights for a point on the schedule's time axis."""

    def __init__(self, patcher, path) -> None:
        scheduled = fileformat.read(path, with_tensors=True)
        self.schedule = scheduled.schedule
        factors = source_factors(scheduled)
        key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
        self.model = patcher.model
        self.parts: dict[str, list] = {}  # model weight -> [(offset or None, module, {source index: ΔW})]
        for name in self.schedule.layers:
            if not name.startswith(("unet.", "transformer.")):
                continue
            target = key_map[scheduled.modules[name].key]
            key, offset = (target, None) if isinstance(target, str) else target[:2]
            deltas = {source: up.flatten(1) @ down.flatten(1) for source, (down, up) in factors[name].items()}
            self.parts.setdefault(key, []).append((offset, name, deltas))
        self.originals = {key: comfy.utils.get_attr(self.model, key).detach().clone() for key in self.parts}

    def set(self, time: float) -> None:
        for key, parts in self.parts.items():
            weight = self.originals[key].clone()
            for offset, name, deltas in parts:
                view = weight if offset is None else weight.narrow(*offset)
                for source in self.schedule.active(name, time):
                    view += deltas[source].reshape(view.shape)
            comfy.utils.get_attr(self.model, key).data.copy_(weight)


def step_times(patcher, axis: str, steps: int, scheduler: str = "normal") -> list[float]:
    """Each step's time: n / N on the progress axis; 1 - t / 1000 of the step's sigma on the noise axis."""
    model_sampling = patcher.get_model_object("model_sampling")
    if axis == "progress":
        return [n / steps for n in range(steps)]
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps)
    return [1.0 - float(model_sampling.timestep(sigmas[n])) / 1000.0 for n in range(steps)]


def reference_sample(patcher, path, noise: torch.Tensor, conds: tuple[list, list], steps: int, sampler: str,
                     cfg: float, axis: str = "progress", scheduler: str = "normal", seed: int = 0) -> torch.Tensor:
    """Sample a plain (un-noded) model whose weights are set by hand before each evaluation of each step."""
    weights = HandSetWeights(patcher, path)
    times = step_times(patcher, axis, steps, scheduler)
    per_step = EVALS_PER_STEP[sampler]
    calls = iter([n for n in range(steps) for _ in range(per_step if n < steps - 1 else 1)])

    def set_weights(executor, x, timestep, model_options, seed):
        weights.set(times[next(calls)])
        return executor(x, timestep, model_options, seed)

    model = patcher.clone()
    model.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, "reference", set_weights)
    out = sample(model, noise, conds, steps, sampler, cfg, scheduler, seed)
    assert next(calls, None) is None, f"{sampler} evaluated the model fewer times than EVALS_PER_STEP says"
    return out
