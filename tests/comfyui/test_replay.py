"""The node replays the schedule exactly: ComfyUI's own sampling with the node equals the same ComfyUI model with
every step's weights set by hand from the file (reference.py), for K-LoRA `s` and `s*`, feature-kl (noise axis),
a second-order and an ancestral second-order sampler, at the file's step count and another, on SD1.x, SDXL (kohya
SGM names) and FLUX (diffusers names, fused qkv); for N sources (two subjects, a style, a static LoRA), phases
without any LoRA (switch, windows), and a format-1 file."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import pack_module
from lorasched.merge import fileformat
from lorasched.merge.clock import Clock, timestep_scale
from reference import reference_sample, sample, step_times
from worlds import FORMAT_1_FILE, KLORA_STEPS, flux_conditioning, sd_conditioning, sdxl_conditioning

TOLERANCE = 1e-4  # float32 latents


def _noise(seed: int, shape=(1, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _switching_steps(path, times: list[float]) -> int:
    """How many steps of this run start with a different set of sources than the step before."""
    schedule = fileformat.read(path).schedule
    states = [tuple(schedule.active(name, time) for name in schedule.layers) for time in times]
    return sum(a != b for a, b in zip(states, states[1:]))


def _check(out: torch.Tensor, reference: torch.Tensor, base: torch.Tensor, label: str) -> None:
    gap = (out - reference).abs().max().item()
    print(f"{label}: max |node - reference| = {gap:.1e} (|latent| up to {out.abs().max().item():.0f}, "
          f"|node - base| up to {(out - base).abs().max().item():.0f})")
    assert gap <= TOLERANCE
    assert (out - base).abs().max().item() > 100 * TOLERANCE  # the file changes the output: the check has teeth


@pytest.mark.parametrize("steps", [KLORA_STEPS, 5])
@pytest.mark.parametrize("name", ["klora-s", "klora-s*"])
def test_klora_replays_exactly(sd, sd_model, apply, name, steps):
    path = sd.files[name]
    assert _switching_steps(path, step_times(sd_model(), "progress", steps)) > 0
    noise, conds = _noise(0), sd_conditioning(0)
    (model, _) = apply(sd_model(), path)
    out = sample(model, noise, conds, steps, "euler", cfg=5.0)
    reference = reference_sample(sd_model(), path, noise, conds, steps, "euler", cfg=5.0)
    _check(out, reference, sample(sd_model(), noise, conds, steps, "euler", cfg=5.0), f"{name} euler {steps}")


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2s_ancestral"])
def test_second_order_samplers_use_one_time_per_step(sd, sd_model, apply, sampler):
    """Heun's corrector at S[n+1], and dpmpp_2s_ancestral's midpoint (S[n+1] itself at eta = 1), belong to step n."""
    path, steps = sd.files["klora-s*"], 6
    noise, conds = _noise(1), sd_conditioning(1)
    (model, _) = apply(sd_model(), path)
    out = sample(model, noise, conds, steps, sampler, cfg=5.0, seed=3)
    reference = reference_sample(sd_model(), path, noise, conds, steps, sampler, cfg=5.0, seed=3)
    _check(out, reference, sample(sd_model(), noise, conds, steps, sampler, cfg=5.0, seed=3), f"{sampler} {steps}")


@pytest.mark.parametrize("seed", [0, 1])
def test_feature_kl_replays_on_the_noise_axis(sd, sd_model, apply, seed):
    path, steps = sd.files["feature-kl"], 6
    assert fileformat.read(path).schedule.axis == "noise"
    assert _switching_steps(path, step_times(sd_model(), "noise", steps)) > 0
    noise, conds = _noise(seed), sd_conditioning(seed)
    (model, _) = apply(sd_model(), path)
    out = sample(model, noise, conds, steps, "euler", cfg=5.0)
    reference = reference_sample(sd_model(), path, noise, conds, steps, "euler", cfg=5.0, axis="noise")
    _check(out, reference, sample(sd_model(), noise, conds, steps, "euler", cfg=5.0), f"feature-kl seed {seed}")


def test_sdxl_klora_under_sgm_names_replays_exactly(sdxl, sdxl_model, apply):
    path, steps = sdxl.files["klora-s*"], KLORA_STEPS
    assert any(record.key.startswith("lora_unet_input_blocks_") for record in fileformat.read(path).modules.values())
    assert _switching_steps(path, step_times(sdxl_model(), "progress", steps)) > 0
    noise, conds = _noise(6), sdxl_conditioning(6)
    (model, _) = apply(sdxl_model(), path)
    out = sample(model, noise, conds, steps, "euler", cfg=5.0)
    reference = reference_sample(sdxl_model(), path, noise, conds, steps, "euler", cfg=5.0)
    _check(out, reference, sample(sdxl_model(), noise, conds, steps, "euler", cfg=5.0), f"sdxl klora-s* euler {steps}")


@pytest.mark.parametrize("steps", [KLORA_STEPS, 5])
def test_flux_klora_replays_exactly(flux, flux_model, apply, steps):
    path = flux.files["klora-s*"]
    assert fileformat.read(path).metadata[fileformat.KEY_TENSOR_FORMAT] == "diffusers"
    assert _switching_steps(path, step_times(flux_model(), "progress", steps)) > 0
    noise, conds = _noise(2), flux_conditioning(2)
    (model, _) = apply(flux_model(), path)
    out = sample(model, noise, conds, steps, "euler", cfg=1.0, scheduler="simple")
    reference = reference_sample(flux_model(), path, noise, conds, steps, "euler", cfg=1.0, scheduler="simple")
    base = sample(flux_model(), noise, conds, steps, "euler", cfg=1.0, scheduler="simple")
    _check(out, reference, base, f"flux klora-s* euler {steps}")


def _sd_replays_exactly(sd_model, apply, path, steps: int, seed: int, label: str) -> torch.Tensor:
    """Euler on the tiny SD model with the node equals the hand-set reference; returns the node's latent."""
    assert _switching_steps(path, step_times(sd_model(), "progress", steps)) > 0
    noise, conds = _noise(seed), sd_conditioning(seed)
    (model, _) = apply(sd_model(), path)
    out = sample(model, noise, conds, steps, "euler", cfg=5.0)
    reference = reference_sample(sd_model(), path, noise, conds, steps, "euler", cfg=5.0)
    _check(out, reference, sample(sd_model(), noise, conds, steps, "euler", cfg=5.0), label)
    return out


@pytest.mark.parametrize("steps", [KLORA_STEPS, 5])
def test_nway_klora_replays_exactly(sd_sets, sd_model, apply, steps):
    """Format 2, four sources: each step, each layer carries the sum of the sources its phase lists (the second
    subject where it wins, the static LoRA beside the style wherever it adapts)."""
    path = sd_sets.files["nway"]
    scheduled = fileformat.read(path)
    assert scheduled.metadata[fileformat.KEY_VERSION] == "2"
    assert scheduled.roles == ("subject", "subject", "style", "static")
    unet = [phases for name, phases in scheduled.schedule.layers.items() if name.startswith("unet.")]
    assert any(len(phases) > 1 and (1,) in {selection for _, selection in phases} for phases in unet)
    assert any((2, 3) in {selection for _, selection in phases} for phases in unet)
    _sd_replays_exactly(sd_model, apply, path, steps, 7, f"nway klora-s* euler {steps}")


@pytest.mark.parametrize("name", ["switch", "windows"])
def test_phases_without_a_lora_replay_exactly(sd_sets, sd_model, apply, name):
    """Switch turns and windows with a gap leave layers with no LoRA for some steps: their weight is the model's."""
    path = sd_sets.files[name]
    layers = fileformat.read(path).schedule.layers
    assert any(selection == () for phases in layers.values() for _, selection in phases)
    _sd_replays_exactly(sd_model, apply, path, KLORA_STEPS, 8, f"{name} euler {KLORA_STEPS}")


def test_a_format_1_file_replays_as_its_format_2_merge(sd, sd_model, node, apply):
    """The golden format-1 file is K-LoRA `s*` of this world's pair, written before format 2. The pack reads its
    named phases and two-entry records into the structure it reads today's merge of the same pair into, and
    samples it bitwise alike, equal to the reference."""
    old, new = fileformat.read(FORMAT_1_FILE), fileformat.read(sd.files["klora-s*"])
    assert old.metadata[fileformat.KEY_VERSION] == "1" and new.metadata[fileformat.KEY_VERSION] == "2"
    assert [source.sha256 for source in old.sources] == [source.sha256 for source in new.sources]
    read = pack_module("schema").read
    ours, theirs = (read(str(path), with_tensors=True).layers() for path in (FORMAT_1_FILE, sd.files["klora-s*"]))
    assert ours.keys() == theirs.keys()
    for name, module in ours.items():
        other = theirs[name]
        assert module.phases == other.phases and module.factors.keys() == other.factors.keys()
        assert all(torch.equal(a, b) for source in module.factors
                   for a, b in zip(module.factors[source], other.factors[source]))
    out = _sd_replays_exactly(sd_model, apply, FORMAT_1_FILE, KLORA_STEPS, 9, "format 1 klora-s* euler")
    (model, _) = apply(sd_model(), sd.files["klora-s*"])
    assert torch.equal(out, sample(model, _noise(9), sd_conditioning(9), KLORA_STEPS, "euler", cfg=5.0))


@pytest.mark.parametrize("world", ["sd", "flux"])
def test_noise_axis_reads_lorasched_clock_value(request, node, world):
    """The node's q for a sigma, from ComfyUI's own timestep of it, is the q lorasched's diffusers clock reads from
    the timestep diffusers calls the denoiser with at that sigma: SD's UNet gets t (ComfyUI rounds it to the
    nearest training step: within 1/1000), FLUX's transformer gets t / 1000 = sigma (equal)."""
    noise_levels = functools.partial(pack_module("patching").noise_levels, pack_module("replay").HOST)
    pipe = getattr(request.getfixturevalue(world), "pipe")
    model_sampling = request.getfixturevalue(f"{world}_model")().get_model_object("model_sampling")
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    clock = Clock(scheduler, "noise", timestep_scale(pipe))
    scheduler.set_timesteps(12)
    sigmas = scheduler.sigmas[:-1].float()
    called_with = scheduler.timesteps / 1000 if world == "flux" else scheduler.timesteps
    diffusers_q = torch.tensor([clock(t) for t in called_with])
    comfy_q = torch.tensor(noise_levels("file", sigmas, model_sampling))
    assert (comfy_q - diffusers_q).abs().max().item() <= (1e-3 if world == "sd" else 1e-6)


@pytest.mark.parametrize("split", ["two samplers", "refiner"])
def test_split_sampling_replays_as_one_ksampler(sd, sd_model, apply, split):
    """Two KSamplerAdvanced nodes (20 steps: 0 to 12 with leftover noise, then 12 to 20) on the node's model, or
    on two models each with its own node (a refiner split), replay as one KSampler of 20 steps: each piece is
    recognised within ComfyUI's 20-step schedule, so its steps keep their p = n / 20."""
    import comfy.samplers
    import nodes

    path, steps, cut, seed = sd.files["klora-s*"], 20, 12, 6
    schedule = fileformat.read(path).schedule
    assert any(schedule.active(name, 0.0) != schedule.active(name, cut / steps) for name in schedule.layers), \
        "the second piece would replay differently if it restarted the schedule"
    positive, negative = sd_conditioning(seed)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (model, _) = apply(sd_model(), path)
    (whole,) = nodes.KSampler().sample(model, seed, steps, 5.0, "euler", "normal", positive, negative, latent)
    second = model if split == "two samplers" else apply(sd_model(), path)[0]
    advanced = nodes.KSamplerAdvanced()
    (first,) = advanced.sample(model, "enable", seed, steps, 5.0, "euler", "normal", positive, negative, latent, 0,
                               cut, "enable")
    (out,) = advanced.sample(second, "disable", seed, steps, 5.0, "euler", "normal", positive, negative, first, cut,
                             steps, "disable")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    place = pack_module("replay").place_of_run
    model_sampling = model.get_model_object("model_sampling")
    assert place(tuple(sigmas[: cut + 1].tolist()), model_sampling) == (0, steps)
    assert place(tuple(sigmas[cut:].tolist()), model_sampling) == (cut, steps)
    gap = (out["samples"] - whole["samples"]).abs().max().item()
    print(f"{split}: max |split - unsplit| = {gap:.1e}")
    assert gap <= TOLERANCE


def test_img2img_denoise_keeps_the_place_of_a_full_run(sd_model, node):
    """ComfyUI denoises 0.5 of 10 steps as the last 10 steps of a 20-step schedule: p = (10 + n) / 20, as
    diffusers' img2img reads it."""
    import comfy.samplers

    model_sampling = sd_model().get_model_object("model_sampling")
    sampler = comfy.samplers.KSampler(sd_model(), 10, "cpu", "euler", "karras", denoise=0.5)
    assert pack_module("replay").place_of_run(tuple(sampler.sigmas.tolist()), model_sampling) == (10, 20)
