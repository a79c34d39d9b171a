"""A tiny reForge: the vendored reForge's own patcher, LoRA extension, samplers and callbacks around a tiny SD1
model, with only the WebUI shell stubbed (modules.shared, sd_models, cache/hashes, the UI packages).

What runs for real: `ldm_patched` (UnetPatcher, LoRA key maps and adapters, `load_lora_for_models`, model loading,
`sampling_function`, its k-diffusion samplers), the built-in Lora extension (`<lora:NAME:S>` parsed by
`modules.extra_networks`, `ExtraNetworkLora.activate` -> `networks.load_networks`), `modules.prompt_parser`'s
conditioning, `KDiffusionSampler` / `CFGDenoiser` (with `on_cfg_denoiser` callbacks) and `sd_samplers_common`.
What is stubbed: the parts of the shell that need a real checkpoint, gradio or the settings UI. `generate` plays
`processing.py`'s order for one batch (extra networks, forge_objects copies, process_before_every_sampling, the
sampler, the hires pass) so the extension runs exactly where the WebUI calls it.

The model is ldm_patched's own SD15 class around lorasched's tiny diffusers UNet (converted with ldm_patched's own
diffusers->LDM key map); lorasched files are merged by lorasched itself. `measure` times the replay against the same
file as a plain LoRA.
"""

from __future__ import annotations

import atexit
import importlib
import sys
import tempfile
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch
from shell import Options

REPO = Path(__file__).resolve().parents[2]
REFORGE = REPO.parent / "shared" / "vendor" / "reForge"
EXTENSION = REPO / "sd-webui-lorasched"
CPU = torch.device("cpu")
KLORA_STEPS = 8  # the reference step count written into the files
CFG = 5.0
DENOISE = 0.5  # the hires pass's denoising strength

# The options the code paths exercised here read (reForge's defaults), and the shell's state object.
OPTIONS = {
    "sd_sampling": "ldm patched (Comfy)", "enable_quantization": False, "always_discard_next_to_last_sigma": False,
    "use_old_karras_scheduler_sigmas": False, "sgm_noise_multiplier": False, "sigma_min": 0.0, "sigma_max": 0.0,
    "rho": 0.0, "eta_ancestral": 1.0, "refiner_switch_by_sample_steps": False, "skip_early_cond": 0.0,
    "pad_cond_uncond": False, "pad_cond_uncond_v0": False, "live_previews_enable": False,
    "show_progress_every_n_steps": 10, "img2img_extra_noise": 0.0, "img2img_fix_steps": False,
    "euler_og_s_churn": 0.0, "euler_og_s_tmin": 0.0, "euler_og_s_noise": 1.0, "heun_og_s_churn": 0.0,
    "heun_og_s_tmin": 0.0, "heun_og_s_noise": 1.0, "sd_lora": "None", "extra_networks_default_multiplier": 1.0,
    "lora_add_hashes_to_infotext": False, "lora_preferred_name": "Filename", "list_hidden_files": True,
    "lora_bundled_ti_to_infotext": False,
}


class State(SimpleNamespace):
    """`shared.state`, the fields sampling reads and writes."""

    def nextjob(self) -> None:
        self.sampling_step = 0


class ForgeObjects:
    """`modules_forge.forge_loader.ForgeSD` (that module imports the whole checkpoint loader)."""

    def __init__(self, unet, clip=None, vae=None, clipvision=None) -> None:
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self) -> "ForgeObjects":
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


def _stub(name: str, **attributes) -> types.ModuleType:
    """A stand-in module, registered as the real one would be (in sys.modules and on its parent package)."""
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(importlib.import_module(parent), child, module)
    return module


def _read_metadata(filename: str) -> dict:
    from safetensors import safe_open

    with safe_open(filename, "pt") as handle:
        return handle.metadata() or {}


_HOST: SimpleNamespace | None = None


def install_host(lora_dir: Path) -> SimpleNamespace:
    """Import the vendored reForge (once) with the shell stubbed; `lora_dir` is the WebUI's models/Lora folder,
    scanned for networks as the Lora extension does at start (again on each call: put the files there first)."""
    global _HOST
    if _HOST is not None:
        _HOST.shared.cmd_opts.lora_dir = str(lora_dir)
        _HOST.networks.list_available_networks()
        return _HOST
    sys.dont_write_bytecode = True  # the vendored tree is read-only in CI
    sys.path[:0] = [str(REFORGE), str(REFORGE / "extensions-builtin" / "Lora"), str(EXTENSION)]
    argv, sys.argv = sys.argv, [sys.argv[0], "--always-cpu"]  # ldm_patched reads its options from argv once enabled
    import ldm_patched.modules.options

    ldm_patched.modules.options.enable_args_parsing(True)
    import ldm_patched.modules.args_parser  # noqa: F401

    sys.argv = argv
    torch.set_num_threads(1)  # tiny models gain nothing from intra-op threads; a shared 2-core host loses a lot

    shared = _stub("modules.shared", opts=Options(OPTIONS), cmd_opts=SimpleNamespace(lora_dir=str(lora_dir)),
                   state=State(interrupted=False, skipped=False, sampling_step=0, sampling_steps=0, job=""),
                   sd_model=None, device=CPU, parallel_processing_allowed=True,
                   total_tqdm=SimpleNamespace(update=lambda: None))
    _stub("modules.sd_models", model_data=SimpleNamespace(get_sd_model=lambda: shared.sd_model),
          read_metadata_from_safetensors=_read_metadata)
    for name in ("modules.images", "modules.sd_vae_approx", "modules.sd_vae_taesd", "modules.sd_samplers",
                 "modules.scripts"):
        _stub(name)
    _stub("modules.cache", cached_data_for_file=lambda subsection, title, filename, func: func())
    _stub("modules.hashes", sha256_from_cache=lambda *args, **kwargs: None, sha256=lambda *args, **kwargs: None)
    _stub("modules.extensions", find_extension=lambda filename: None, extensions=[])
    _stub("modules.models.sd3.mmdit", QkvLinear=type("QkvLinear", (torch.nn.Linear,), {}))
    _stub("gradio", Blocks=object)
    _stub("fastapi", FastAPI=object)

    from modules import util

    shared.walk_files = util.walk_files
    import extra_networks_lora
    import ldm_patched.modules.lora
    import ldm_patched.modules.model_detection
    import ldm_patched.modules.supported_models
    import ldm_patched.modules.utils
    import networks
    from modules import extra_networks, script_callbacks, sd_samplers_kdiffusion
    from modules_forge.unet_patcher import UnetPatcher

    networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()  # what lora_script.before_ui does
    extra_networks.register_extra_network(networks.extra_network_lora)
    from extension import load_script
    from lorasched_webui import reforge

    script = load_script()  # registers the clock on on_cfg_denoiser, as in the WebUI
    atexit.register(_release)
    _HOST = SimpleNamespace(shared=shared, networks=networks, extra_networks=extra_networks,
                            script_callbacks=script_callbacks, samplers=sd_samplers_kdiffusion, UnetPatcher=UnetPatcher,
                            lora=ldm_patched.modules.lora, utils=ldm_patched.modules.utils,
                            detection=ldm_patched.modules.model_detection,
                            supported_models=ldm_patched.modules.supported_models, reforge=reforge, script=script)
    return _HOST


def _release() -> None:
    """At exit, while the modules still exist: unload and drop every patcher (ModelPatcher.__del__ reads module
    globals that interpreter shutdown has already cleared), including the extension's cached clone."""
    import gc

    import ldm_patched.modules.model_management

    ldm_patched.modules.model_management.unload_all_models()
    ldm_patched.modules.model_management.current_loaded_models.clear()
    _HOST.shared.sd_model = None
    _HOST.reforge._built = None
    gc.collect()


def reforge_unet(unet):
    """ldm_patched's SD15 model class (detected from the converted weights) around a tiny diffusers
    UNet2DConditionModel's weights, in reForge's UnetPatcher, as forge_loader makes the denoiser of a checkpoint."""
    host = _HOST
    config = unet.config
    blocks = len(config.block_out_channels)
    per_block = config.transformer_layers_per_block
    per_block = [per_block] * blocks if isinstance(per_block, int) else list(per_block)
    depth = [layers if "CrossAttn" in kind else 0 for kind, layers in zip(config.down_block_types, per_block)]
    layout = {  # what ldm_patched's diffusers->LDM key map needs; output depths shallow first, as it pops them
        "num_res_blocks": [config.layers_per_block] * blocks,
        "channel_mult": [width // config.block_out_channels[0] for width in config.block_out_channels],
        "transformer_depth": [d for d in depth for _ in range(config.layers_per_block)],
        "transformer_depth_output": [d for d in depth for _ in range(config.layers_per_block + 1)],
        "transformer_depth_middle": depth[-1],
    }
    names = host.utils.unet_to_diffusers(layout)
    state_dict = {names[key]: value.clone() for key, value in unet.state_dict().items()}
    unet_config = host.detection.detect_unet_config(state_dict, "")
    unet_config["num_heads"] = config.attention_head_dim  # diffusers' SD1 `attention_head_dim` is the head count
    model_config = host.supported_models.SD15(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(state_dict, "")
    model.load_model_weights(state_dict, "")
    return host.UnetPatcher(model, load_device=CPU, offload_device=CPU)


def sd_model(unet) -> SimpleNamespace:
    """The parts of reForge's loaded `sd_model` that the Lora extension and the samplers read."""
    objects = ForgeObjects(unet)
    return SimpleNamespace(forge_objects=objects, forge_objects_original=objects.shallow_copy(),
                           forge_objects_after_applying_lora=objects.shallow_copy(), current_lora_hash=str([]),
                           alphas_cumprod=1 / (1 + unet.model.model_sampling.sigmas.float() ** 2),
                           model=SimpleNamespace(conditioning_key="crossattn"), cond_stage_key="crossattn",
                           parameterization="eps", is_sdxl=False)


def conditioning(seed: int, steps: int, width: int = 32) -> tuple:
    """Random cond / uncond in prompt_parser's structures (what setup_conds hands the sampler)."""
    from modules.prompt_parser import (ComposableScheduledPromptConditioning, MulticondLearnedConditioning,
                                       ScheduledPromptConditioning)

    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(8, width, generator=generator)
    uncond = torch.randn(8, width, generator=generator)
    multicond = MulticondLearnedConditioning(shape=(1,), batch=[[ComposableScheduledPromptConditioning(
        [ScheduledPromptConditioning(steps, cond)])]])
    return multicond, [[ScheduledPromptConditioning(steps, uncond)]]


def processing(model: SimpleNamespace, prompt: str, steps: int, sampler: str, seed: int, **fields) -> SimpleNamespace:
    """The fields of a StableDiffusionProcessingTxt2Img that extra networks and sampling read."""
    return SimpleNamespace(sd_model=model, prompt=prompt, steps=steps, sampler_name=sampler, seeds=[seed],
                           all_seeds=[seed], iteration=0, batch_size=1, cfg_scale=CFG, scheduler="Automatic",
                           hr_scheduler=None, is_hr_pass=False, hr_cfg=CFG, sampler_noise_scheduler_override=None,
                           extra_generation_params={}, eta=None, s_min_uncond=0.0, s_churn=0.0, s_tmin=0.0,
                           s_tmax=None, s_noise=1.0, refiner_switch_at=None, refiner_checkpoint_info=None,
                           disable_extra_networks=False, scripts=None, rng=None, denoising_strength=DENOISE,
                           hr_second_pass_steps=0,
                           mask=None, nmask=None, image_cfg_scale=None, **fields)


def create_sampler(name: str, model: SimpleNamespace):
    """`sd_samplers.create_sampler` for the k-diffusion samplers (that module pulls in every sampler family)."""
    host = _HOST
    data = host.samplers.k_diffusion_samplers_map[name]
    host.shared.sd_model = model
    sampler = data.constructor(model)
    sampler.config = data
    return sampler


def generate(model: SimpleNamespace, prompt: str, steps: int, sampler: str = "Euler", seed: int = 0,
             hires_steps: int | None = None, replay: bool = True) -> torch.Tensor:
    """One batch as processing.py runs it: `<lora:…>` activated by the extra-networks registry, the denoiser
    copied from forge_objects_after_applying_lora before each sampling, process_before_every_sampling (the
    extension, unless `replay` is False: the file stays the Lora extension's plain static mix), the sampler;
    with `hires_steps`, a latent-upscale hires pass of that many steps (img2img at DENOISE)."""
    host = _HOST
    host.shared.sd_model = model
    p = processing(model, prompt, steps, sampler, seed)
    model.forge_objects = model.forge_objects_original.shallow_copy()
    _, p.extra_network_data = host.extra_networks.parse_prompts([prompt])
    host.extra_networks.activate(p, p.extra_network_data)
    if replay:
        host.script.process_batch(p, True)
    c, uc = conditioning(seed, steps)

    def sample(run: str, *args, **kwargs) -> torch.Tensor:
        p.sampler = create_sampler(sampler, model)
        model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()
        if replay:
            host.script.process_before_every_sampling(p, True)
        return getattr(p.sampler, run)(p, *args, **kwargs)

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    samples = sample("sample", noise, c, uc)
    if hires_steps is None:
        return samples
    p.is_hr_pass, p.hr_second_pass_steps = True, hires_steps
    upscaled = torch.nn.functional.interpolate(samples, scale_factor=2, mode="nearest")
    hires_noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed + 1))
    return sample("sample_img2img", upscaled, hires_noise, c, uc, steps=hires_steps)


def make_files(folder: Path) -> SimpleNamespace:
    """lorasched's tiny SD pipeline (saved as the merge base) and files merged by lorasched from random kohya
    LoRAs (denoiser only: the test model has no text encoder): a K-LoRA `s*` pair (layers switching between the
    subject and the style) and an N-way `windows` file of two subjects and a style (subjects on [0, 0.3), styles
    on [0.6, 1): LoRA-free phases between), a calibrated feature-kl pair (noise axis), and a plain LoRA."""
    from lorasched.convert import Calibration, MergeRequest, merge_loras
    from lorasched.merge import rules
    from lorasched.merge.checks import LoraSpec
    from lorasched.merge.lora import STYLE, SUBJECT
    from lorasched.tiny import random_kohya_lora, tiny_sd_pipeline
    from safetensors.torch import save_file

    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(folder / "base")
    loras = {"subject": random_kohya_lora(pipe, 4, 2.0, seed=1),
             "style": random_kohya_lora(pipe, 8, 3.0, seed=2, targets=("to_q", "to_k", "to_v", "ff.net.2")),
             "subject2": random_kohya_lora(pipe, 2, 1.0, seed=11, targets=("to_k", "to_out.0", "proj_in"))}
    for name, tensors in loras.items():
        save_file(tensors, folder / f"{name}.safetensors")
    spec = {name: str(folder / f"{name}.safetensors") for name in loras}

    def merge(output: str, specs: list, method: str, calibration: Calibration = Calibration(), **options) -> Path:
        merge_loras(MergeRequest(str(folder / "base"), tuple(specs), str(folder / output), method,
                                 rules.RuleOptions(**options), steps=KLORA_STEPS, device="cpu",
                                 calibration=calibration))
        return folder / output

    pair = [LoraSpec(spec["subject"], SUBJECT), LoraSpec(spec["style"], STYLE)]

    files = {
        "klora": merge("klora.safetensors", pair, "klora", pattern="s*"),
        "nway": merge("nway.safetensors", [LoraSpec(spec["subject"], SUBJECT), LoraSpec(spec["subject2"], SUBJECT),
                                           LoraSpec(spec["style"], STYLE)], "windows", windows=(0.3, 0.6)),
        "feature-kl": merge("feature_kl.safetensors", pair, "feature-kl", Calibration(
            prompts=("a photo of sks dog",), seeds=(0, 1), size=32, guidance=5.0)),
    }
    return SimpleNamespace(pipe=pipe, files=files, plain=folder / "style.safetensors", folder=folder)


# Model evaluations per step, read off ldm_patched/k_diffusion/sampling.py (the last step, ending at sigma 0, takes
# one): the reference's own account of which step an evaluation belongs to.
EVALS_PER_STEP = {"Euler": 1, "Heun": 2}


class HandSetWeights:
    """Writes a model's scheduled weights for a point on the schedule's time axis with plain torch: original +
    strength * the active sources' deltas, read by lorasched itself (`fileformat.read`, `source_factors`, its
    `Schedule`); ldm_patched's key map only says which weight a key patches."""

    def __init__(self, unet, path: Path, strength: float) -> None:
        from lorasched.merge import fileformat
        from lorasched.merge.replay import source_factors

        scheduled = fileformat.read(path, with_tensors=True)
        self.schedule = scheduled.schedule
        factors = source_factors(scheduled)
        key_map = _HOST.lora.model_lora_keys_unet(unet.model, {})
        self.model = unet.model
        self.parts: dict[str, list] = {}  # model weight -> [(module, {source index: strength * ΔW})]
        for name in self.schedule.layers:
            if name.startswith("unet."):
                deltas = {source: strength * (up.flatten(1) @ down.flatten(1))
                          for source, (down, up) in factors[name].items()}
                self.parts.setdefault(key_map[scheduled.modules[name].key], []).append((name, deltas))
        self.originals = {key: _HOST.utils.get_attr(self.model, key).detach().clone() for key in self.parts}

    def set(self, time: float) -> None:
        for key, parts in self.parts.items():
            weight = self.originals[key].clone()
            for name, deltas in parts:
                for source in self.schedule.active(name, time):
                    weight += deltas[source].reshape(weight.shape)
            _HOST.utils.get_attr(self.model, key).data.copy_(weight)


def reference(pipe, path: Path, strength: float, steps: int, sampler: str = "Euler", seed: int = 0,
              hires_steps: int | None = None) -> torch.Tensor:
    """The same generation on a fresh model of the same weights with no LoRA in the prompt, each evaluation's
    weights set by hand: for p = n / N of its step, n counted from the sampler's structure (EVALS_PER_STEP) in each
    sampling run; the hires pass's steps are the last `hires_steps` of a schedule of hires_steps / DENOISE steps
    (how reForge cuts an img2img run, sd_samplers_common.setup_img2img_steps). On the noise axis: q = 1 - t / 1000
    of the evaluation's own sigma, t the model's discrete timestep of it."""
    model = sd_model(reforge_unet(pipe.unet))
    weights = HandSetWeights(model.forge_objects.unet, path, strength)
    runs = [(0, steps, steps)]  # per sampling run: (first step, steps, schedule length)
    if hires_steps:
        runs.append((int(hires_steps / DENOISE) - hires_steps, hires_steps, int(hires_steps / DENOISE)))
    plan: dict[object, list[float]] = {}  # sampling run (its CFG denoiser) -> remaining evaluation times

    def set_weights(params) -> None:
        if params.denoiser not in plan:
            (offset, run, total), per_step = runs[len(plan)], EVALS_PER_STEP[sampler]
            plan[params.denoiser] = [(offset + n) / total for n in range(run)
                                     for _ in range(per_step if n < run - 1 else 1)]
        time = plan[params.denoiser].pop(0)
        if weights.schedule.axis == "noise":
            time = 1 - float(model.forge_objects.unet.model.model_sampling.timestep(params.sigma[:1])) / 1000
        weights.set(time)

    _HOST.script_callbacks.on_cfg_denoiser(set_weights, name="reference")
    try:
        out = generate(model, "a photo", steps, sampler, seed, hires_steps)
    finally:
        _HOST.script_callbacks.remove_callbacks_for_function(set_weights)
    assert len(plan) == len(runs) and not any(plan.values()), "EVALS_PER_STEP does not match the sampler"
    return out


def measure(steps: int = 20, repeats: int = 5, file: str = "klora") -> dict:
    """Step time of the tiny model with a lorasched file replayed vs the same file as the Lora extension's plain
    LoRA (its static mix), Euler: each mode timed after an untimed run that loads its weights, in turns, fastest
    of `repeats`; `extension_ms_per_step` is the time inside the extension's clock (switches and rewrites) in
    that fastest replayed run. For a benchmark script: builds its own world in a temporary folder."""
    import shutil

    previous = Path(_HOST.shared.cmd_opts.lora_dir) if _HOST is not None else None
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        world = make_files(folder)
        (folder / "Lora").mkdir()
        shutil.copy(world.files[file], folder / "Lora" / world.files[file].name)
        install_host(folder / "Lora")
        model = sd_model(reforge_unet(world.pipe.unet))
        prompt = f"a photo <lora:{world.files[file].stem}:1>"
        times, spent = {True: [], False: []}, []
        callbacks = _HOST.script_callbacks

        def timed(params) -> None:  # the extension's callback, timed
            start = time.perf_counter()
            _HOST.reforge.on_cfg_denoiser(params)
            spent.append(time.perf_counter() - start)

        callbacks.remove_callbacks_for_function(_HOST.reforge.on_cfg_denoiser)
        callbacks.on_cfg_denoiser(timed, name="lorasched-timed")
        try:
            for _ in range(repeats):
                for replay in (True, False):
                    generate(model, prompt, steps, replay=replay)  # untimed: loads this mode's patched weights
                    spent.clear()
                    start = time.perf_counter()
                    generate(model, prompt, steps, replay=replay)
                    times[replay].append((time.perf_counter() - start, sum(spent)))
        finally:
            callbacks.remove_callbacks_for_function(timed)
            callbacks.on_cfg_denoiser(_HOST.reforge.on_cfg_denoiser, name="lorasched")
            if previous is not None:
                install_host(previous)
        (replayed, in_extension), (plain, _) = min(times[True]), min(times[False])
        return {"steps": steps, "file": file, "replayed_s": replayed, "plain_s": plain, "ratio": replayed / plain,
                "replayed_ms_per_step": 1000 * replayed / steps, "plain_ms_per_step": 1000 * plain / steps,
                "extension_ms_per_step": 1000 * in_extension / steps}
