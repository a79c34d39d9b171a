"""Where a model evaluation sits in the schedule a WebUI sampler run was cut from. A1111 and reForge count a run's
evaluations in the same CFG denoiser; all three WebUIs cut img2img runs (img2img, the hires pass) from a longer
schedule with the same `setup_img2img_steps`."""

from __future__ import annotations

from modules.sd_samplers_common import setup_img2img_steps


def cut(p) -> tuple[int, int]:
    """(steps, t_enc) of an img2img run: it samples the last t_enc + 1 steps of a schedule of `steps`, as
    `sample_img2img` computes it (the hires pass with its own step count)."""
    return setup_img2img_steps(p, (p.hr_second_pass_steps or p.steps) if p.is_hr_pass else None)


def progress(denoiser) -> float:
    """p = n / N of the evaluation's step n in the full schedule of N steps, by the WebUI's own measure of a run
    (prompt editing and the refiner switch read it alike): `step`, the evaluations done so far, over the
    evaluations the sampler's config plans per step (`total_steps / steps`, 2 for second-order samplers, set by
    `launch_sampling`). Exact for the fixed-step samplers (first order; Heun, DPM2, DPM++ 2S a, DPM++ SDE evaluate
    twice per step but once in the last). An img2img run's p continues the schedule it was cut from (`cut`), as in
    Forge and the ComfyUI node."""
    run = max(denoiser.steps, 1)
    step = min(denoiser.step * run // max(denoiser.total_steps, 1), run - 1)
    offset, total = 0, run
    if denoiser.init_latent is not None:
        steps, t_enc = cut(denoiser.p)
        if t_enc + 1 == run:
            offset, total = steps - run, steps
    return (offset + step) / total
