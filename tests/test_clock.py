"""The time axis on its own, against each diffusers scheduler family: a denoiser call's timestep -> progress n/N
and noise level q = 1 - t/T. Replay and the online reference both read time through `Clock`, so only a test of
the clock itself can catch a misread timestep."""

import pytest
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       HeunDiscreteScheduler, KDPM2DiscreteScheduler, PNDMScheduler,
                       UniPCMultistepScheduler)

from lorasched.merge.clock import Clock

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
FAMILIES = {
    "euler": (EulerDiscreteScheduler, SD | {"steps_offset": 1}),
    "euler-leading": (EulerDiscreteScheduler, SD | {"timestep_spacing": "leading", "steps_offset": 1}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, SD),
    "ddim": (DDIMScheduler, SD | {"set_alpha_to_one": False, "steps_offset": 1}),
    "dpm++2m": (DPMSolverMultistepScheduler, SD),
    "dpm++2m-karras": (DPMSolverMultistepScheduler, SD | {"use_karras_sigmas": True}),
    "dpm-singlestep": (DPMSolverSinglestepScheduler, SD),
    "unipc": (UniPCMultistepScheduler, SD),
    "pndm": (PNDMScheduler, SD | {"skip_prk_steps": True}),
    "heun (second order)": (HeunDiscreteScheduler, SD),
    "kdpm2 (second order)": (KDPM2DiscreteScheduler, SD),
    "flow-match (SD3)": (FlowMatchEulerDiscreteScheduler, {"shift": 3.0}),
}


@pytest.mark.parametrize("steps", [1, 7, 30])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_call_reads_its_step_and_noise_level(family, steps):
    cls, config = FAMILIES[family]
    scheduler = cls(**config)
    scheduler.set_timesteps(steps)
    progress, noise = Clock(scheduler), Clock(scheduler, axis="noise")
    calls = list(scheduler.timesteps)  # what the pipeline hands its denoiser, one call per entry
    seen_p = [progress(t) for t in calls]
    distinct = list(dict.fromkeys(seen_p))
    assert distinct == [n / len(distinct) for n in range(len(distinct))]
    assert seen_p == sorted(seen_p), "progress never runs backwards within a run"
    assert all(p1 == p2 for t1, t2, p1, p2 in zip(calls, calls[1:], seen_p, seen_p[1:]) if t1 == t2), \
        "the calls of one timestep (second-order samplers) read one progress"
    train = scheduler.config.num_train_timesteps
    assert [noise(t) for t in calls] == pytest.approx([min(max(1 - float(t) / train, 0.0), 1.0) for t in calls])


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_a_flux_transformer_timestep_divided_by_1000_reads_the_same(shift):
    """FLUX pipelines hand the transformer timestep / 1000. Unshifted, the schedule ends on t = 1, the value of
    FLUX's first call: the pipeline's denoiser class, not the value, says which scale a call is on."""
    from lorasched.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    pipe.scheduler.set_timesteps(12)
    clock, reference = Clock.of(pipe), Clock(pipe.scheduler)
    assert clock.scale == 1000.0 and float(pipe.scheduler.timesteps[-1]) >= 1.0
    assert [clock(t / 1000) for t in pipe.scheduler.timesteps] == [reference(t) for t in pipe.scheduler.timesteps]
    assert [clock(t / 1000) for t in pipe.scheduler.timesteps] == [n / 12 for n in range(12)]


def test_an_sd_run_that_ends_on_timestep_1_reads_its_last_step():
    euler = EulerDiscreteScheduler(**SD, steps_offset=1, timestep_spacing="leading")
    euler.set_timesteps(1000)
    assert float(euler.timesteps[-1]) == 1.0 and Clock(euler)(euler.timesteps[-1]) == 999 / 1000


def test_a_batch_of_timesteps_and_a_python_number_read_alike():
    scheduler = EulerDiscreteScheduler(**SD)
    scheduler.set_timesteps(5)
    clock = Clock(scheduler)
    t = scheduler.timesteps[2]
    assert clock(t.repeat(4)) == clock(float(t)) == clock(t) == 2 / 5


def test_the_clock_follows_a_new_step_count_between_runs():
    scheduler = EulerDiscreteScheduler(**SD)
    clock = Clock(scheduler)
    scheduler.set_timesteps(4)
    assert [clock(t) for t in scheduler.timesteps] == [0, 0.25, 0.5, 0.75]
    scheduler.set_timesteps(5)
    assert [clock(t) for t in scheduler.timesteps] == [0, 0.2, 0.4, 0.6, 0.8]
