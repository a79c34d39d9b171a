"""A tiny Forge for the Forge host's tests: the vendored Forge's real backend (patchers, LoraLoader, operations,
sampling function), k-diffusion samplers (`KDiffusionSampler`, `CFGDenoiser`), prompt parsing, extra-network
activation and built-in LoRA extension (`<lora:NAME:S>` → `networks.load_networks`), on a tiny SD1 model that
Forge's own classes build from a tiny diffusers UNet and CLIP with random weights.

Stubbed, because they are the WebUI shell and need gradio, a checkpoint and a launcher: `modules.shared` (options,
state, the current model), `modules.sd_models`, `modules.scripts`, `modules.cache`, `modules.hashes`, the image /
preview modules `sd_samplers_common` imports, `modules_forge.main_entry`, and for `modules.script_callbacks` the
`fastapi`/`gradio` names it imports plus `modules.extensions`/`modules.util`. `generate` walks what
`processing.process_images_inner` and `StableDiffusionProcessingTxt2Img.sample` do for one txt2img batch, calling
the extension where its Script hooks in (`process_batch`, `process_before_every_sampling`).

`measure(steps=...)` times the replay against the same file as a plain LoRA (what the benchmark script calls).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import types
import zlib
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[2]
FORGE = REPO.parent / "shared" / "vendor" / "Forge"
EXTENSION = REPO / "sd-webui-lorasched"
LORA_EXTENSION = FORGE / "extensions-builtin" / "sd_forge_lora"

sys.dont_write_bytecode = True  # the vendored Forge is read-only in CI
os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
torch.set_num_threads(1)  # tiny models gain nothing from intra-op threads; a shared 2-core host loses a lot

KLORA_STEPS = 8  # the reference step count written into the files
LATENT = (1, 4, 8, 8)
TOKENS, WIDTH = 8, 32  # the tiny UNet's cross-attention context


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


# `shared.opts`: a default WebUI's values of the options this path reads
OPTS = SimpleNamespace(
    sd_lora="None", lora_add_hashes_to_infotext=False, skip_early_cond=0.0, s_min_uncond_all=False,
    always_discard_next_to_last_sigma=False, use_old_karras_scheduler_sigmas=False, sigma_min=0.0, sigma_max=0.0,
    rho=0.0, sgm_noise_multiplier=False, eta_ancestral=1.0, live_previews_enable=False,
    show_progress_every_n_steps=-1, s_churn=0.0, s_tmin=0.0, s_tmax=0.0, s_noise=1.0, img2img_extra_noise=0.0,
    img2img_fix_steps=False,
)
DENOISE = 0.5  # the hires pass's denoising strength


def _stub_shell(lora_dir: Path) -> None:
    """The WebUI shell modules this path imports, as far as it uses them."""
    state = SimpleNamespace(interrupted=False, skipped=False, stopping_generation=False, sampling_step=0,
                            sampling_steps=0, current_latent=None, job="")
    _module("modules.shared", opts=OPTS, state=state, sd_model=None, device=torch.device("cpu"),
            cmd_opts=SimpleNamespace(lora_dir=str(lora_dir)), parallel_processing_allowed=True,
            total_tqdm=SimpleNamespace(update=lambda: None),
            walk_files=lambda path, allowed_extensions: [str(f) for f in Path(path).rglob("*")
                                                         if f.suffix in allowed_extensions])
    shared = sys.modules["modules.shared"]
    _module("modules.sd_models", model_data=SimpleNamespace(get_sd_model=lambda: shared.sd_model),
            read_metadata_from_safetensors=_read_metadata)
    _module("modules.scripts", scripts_txt2img=SimpleNamespace(infotext_fields=[]))
    _module("modules.cache", cached_data_for_file=lambda subsection, title, filename, func: func())
    _module("modules.hashes", sha256_from_cache=lambda *args, **kwargs: None, sha256=lambda *args, **kwargs: None)
    for name in ("images", "sd_vae_approx", "sd_vae_taesd", "sd_samplers", "util"):
        _module(f"modules.{name}")
    _module("modules.extensions", extensions=[], find_extension=lambda filename: None)
    _module("modules_forge.main_entry")
    _module("fastapi", FastAPI=type("FastAPI", (), {}))
    _module("gradio", Blocks=type("Blocks", (), {}))


def _read_metadata(filename: str) -> dict:
    from safetensors import safe_open

    with safe_open(filename, "pt") as handle:
        return handle.metadata() or {}


_imported: SimpleNamespace | None = None


def forge(lora_dir: Path) -> SimpleNamespace:
    """Import the vendored Forge (once per process; `lora_dir` is Forge's LoRA folder) and the extension."""
    global _imported
    if _imported is not None:
        return _imported
    lora_dir.mkdir(parents=True, exist_ok=True)
    for path in (EXTENSION, LORA_EXTENSION, FORGE / "packages_3rdparty", FORGE):
        sys.path.insert(0, str(path))
    # Forge's k_diffusion is a folder without __init__ (a namespace package): an installed k-diffusion would win
    k_diffusion = _module("k_diffusion")
    k_diffusion.__path__ = [str(FORGE / "k_diffusion")]
    argv, sys.argv = sys.argv, [sys.argv[0], "--always-cpu"]  # backend.args parses the command line at import
    try:
        _stub_shell(lora_dir)
        from backend import memory_management, operations, utils
        from backend.diffusion_engine.base import ForgeObjects
        from backend.nn.clip import IntegratedCLIP
        from backend.nn.unet import IntegratedUNet2DConditionModel
        from backend.patcher.clip import CLIP
        from backend.patcher.lora import model_lora_keys_unet
        from backend.patcher.unet import UnetPatcher
        from modules import extra_networks, prompt_parser, sd_samplers_kdiffusion, sd_samplers_timesteps
        from packages_3rdparty.comfyui_lora_collection.utils import unet_to_diffusers

        import extra_networks_lora
        import networks
        from lorasched_webui import forge as host
        from extension import load_script

        script = load_script()
    finally:
        sys.argv = argv
    extra_networks.register_extra_network(extra_networks_lora.ExtraNetworkLora())
    _imported = SimpleNamespace(
        memory_management=memory_management, operations=operations, utils=utils, ForgeObjects=ForgeObjects,
        IntegratedCLIP=IntegratedCLIP, IntegratedUNet2DConditionModel=IntegratedUNet2DConditionModel, CLIP=CLIP,
        UnetPatcher=UnetPatcher, model_lora_keys_unet=model_lora_keys_unet, extra_networks=extra_networks,
        prompt_parser=prompt_parser, unet_to_diffusers=unet_to_diffusers,
        samplers={data.name: data for data in (*sd_samplers_kdiffusion.samplers_data_k_diffusion,
                                               *sd_samplers_timesteps.samplers_data_timesteps)},
        networks=networks, host=host, script=script, shared=sys.modules["modules.shared"])
    return _imported


class _TextModelLevel(torch.nn.Module):
    """transformers 4's CLIPTextModel layout (`text_model.…`), which Forge's key maps expect, around
    transformers 5's (no `text_model` level)."""

    def __init__(self, config) -> None:
        from transformers import CLIPTextModel

        super().__init__()
        model = CLIPTextModel(config)
        self.text_model = getattr(model, "text_model", model)


def _ldm_config(config) -> dict:
    """The LDM UNet config Forge's checkpoint guesser gives an SD1 UNet of this diffusers config."""
    blocks = len(config.block_out_channels)
    depth = [1 if "CrossAttn" in kind else 0 for kind in config.down_block_types]
    return dict(
        in_channels=config.in_channels, out_channels=config.out_channels, model_channels=config.block_out_channels[0],
        num_res_blocks=[config.layers_per_block] * blocks,
        channel_mult=[width // config.block_out_channels[0] for width in config.block_out_channels],
        transformer_depth=[d for d in depth for _ in range(config.layers_per_block)],
        transformer_depth_output=[d for d in depth for _ in range(config.layers_per_block + 1)],
        transformer_depth_middle=depth[-1], num_heads=config.attention_head_dim, context_dim=config.cross_attention_dim,
        use_spatial_transformer=True, use_linear_in_transformer=config.use_linear_projection,
    )


class TinySD:
    """What `backend.diffusion_engine.sd15.StableDiffusion` holds (`forge_objects`, the original and after-LoRA
    copies, `current_lora_hash`), built like `backend.loader` builds an SD1 checkpoint; conditioning is a fixed
    random tensor per prompt after the text-encoder patcher is loaded (the encoders' LoRA part is static)."""

    def __init__(self, f: SimpleNamespace, pipe) -> None:
        cpu, dtype = f.memory_management.cpu, torch.float32
        config = _ldm_config(pipe.unet.config)
        with f.operations.using_forge_operations(device=cpu, dtype=dtype, manual_cast_enabled=False):
            unet = f.IntegratedUNet2DConditionModel.from_config(config).to(device=cpu, dtype=dtype)
        names = f.unet_to_diffusers(config)
        unet.load_state_dict({names[key]: value for key, value in pipe.unet.state_dict().items()}, strict=True)
        unet._internal_dict = config
        unet.storage_dtype = unet.computation_dtype = dtype
        unet.load_device = unet.offload_device = unet.initial_device = cpu
        guess = SimpleNamespace(huggingface_repo="runwayml/stable-diffusion-v1-5")
        unet_patcher = f.UnetPatcher.from_model(unet, diffusers_scheduler=pipe.scheduler, config=guess)
        with f.operations.using_forge_operations(device=cpu, dtype=dtype, manual_cast_enabled=True):
            text = f.IntegratedCLIP(_TextModelLevel, pipe.text_encoder.config, add_text_projection=True)
        text.transformer.text_model.load_state_dict(pipe.text_encoder.state_dict(), strict=False)
        clip = f.CLIP(model_dict={"clip_l": text}, tokenizer_dict={"clip_l": pipe.tokenizer})
        self.forge_objects = f.ForgeObjects(unet=unet_patcher, clip=clip, vae=None, clipvision=None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.memory_management = f.memory_management
        self.is_sd1, self.is_sdxl, self.sd_checkpoint_info = True, False, None

    def get_learned_conditioning(self, prompts: list[str]) -> torch.Tensor:
        self.memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        seeds = [zlib.crc32(text.encode()) for text in prompts]
        return torch.stack([torch.randn(TOKENS, WIDTH, generator=torch.Generator().manual_seed(seed))
                            for seed in seeds])


class _RNG:
    """`p.rng`: the noise k-diffusion's samplers draw through `TorchHijack` (seeded per run)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed + 1)

    def next(self) -> torch.Tensor:
        return torch.randn(LATENT, generator=self.generator)


def processing(sd_model, prompt: str, steps: int, sampler: str, seed: int, cfg: float) -> SimpleNamespace:
    """The fields of `StableDiffusionProcessingTxt2Img` this path reads."""
    return SimpleNamespace(
        sd_model=sd_model, prompt=prompt, all_prompts=[prompt], negative_prompt="", steps=steps, cfg_scale=cfg,
        sampler_name=sampler, scheduler="Automatic", hr_scheduler=None, is_hr_pass=False, enable_hr=False,
        seeds=[seed], all_seeds=[seed], subseeds=[seed], iteration=0, batch_size=1, rng=_RNG(seed), eta=None,
        s_min_uncond=0.0, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
        sampler_noise_scheduler_override=None, extra_generation_params={}, refiner_switch_at=None,
        refiner_checkpoint_info=None, hr_cfg=cfg, sampler=None, disable_extra_networks=False, scripts=None,
        comment=lambda text: None)


def generate(world: SimpleNamespace, prompt: str, steps: int, sampler: str = "Euler", seed: int = 0,
             cfg: float = 5.0, script: bool = True, before_sampling=None, timings: list | None = None,
             hires_steps: int | None = None) -> torch.Tensor:
    """One txt2img batch as Forge runs it: the prompt's extra networks activated (`<lora:NAME:S>` loads through
    Forge's LoRA extension), conditioning, the k-diffusion sampler; `script`: with the extension's calls where its
    Script runs (its `process_batch` and `process_before_every_sampling`, the accordion on).
    `before_sampling(p)` runs after those, as another script would; `timings` gets the sampler run's seconds.
    `hires_steps`: a latent-upscale hires pass of that many steps as `sample_hr_pass` runs it (a new sampler, the
    Lora extension's objects copied again, the Script's hook again, `sample_img2img` at DENOISE)."""
    f, sd_model = world.forge, world.sd_model
    f.shared.sd_model = sd_model
    p = processing(sd_model, prompt, steps, sampler, seed, cfg)
    sd_model.forge_objects = sd_model.forge_objects_original.shallow_copy()
    prompts, network_data = f.extra_networks.parse_prompts([prompt])
    p.prompts = prompts
    f.extra_networks.activate(p, network_data)
    sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
    if script:
        f.script.process_batch(p, True)
    c = f.prompt_parser.get_multicond_learned_conditioning(sd_model, prompts, steps)
    uc = f.prompt_parser.get_learned_conditioning(sd_model, [p.negative_prompt], steps)
    config = f.samplers[sampler]
    p.sampler = config.constructor(sd_model)
    p.sampler.config = config
    x = torch.randn(LATENT, generator=torch.Generator().manual_seed(seed))
    sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
    if script:
        f.script.process_before_every_sampling(p, True)
    if before_sampling is not None:
        before_sampling(p)
    start = time.perf_counter()
    samples = p.sampler.sample(p, x, c, uc, image_conditioning=None)
    if timings is not None:
        timings.append(time.perf_counter() - start)
    if hires_steps:
        p.is_hr_pass, p.hr_second_pass_steps, p.denoising_strength = True, hires_steps, DENOISE
        upscaled = torch.nn.functional.interpolate(samples, scale_factor=2, mode="nearest")
        p.sampler = config.constructor(sd_model)
        p.sampler.config = config
        sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
        if script:
            f.script.process_before_every_sampling(p, True)
        if before_sampling is not None:
            before_sampling(p)
        noise = torch.randn(upscaled.shape, generator=torch.Generator().manual_seed(seed + 1))
        samples = p.sampler.sample_img2img(p, upscaled, noise, c, uc, steps=hires_steps, image_conditioning=None)
    f.extra_networks.deactivate(p, network_data)
    return samples


def make_world(lora_dir: Path) -> SimpleNamespace:
    """Forge (imported once per process) with `lora_dir` as its LoRA folder, and a fresh tiny SD1 model of
    lorasched's tiny pipeline (seeded: every world has the same weights)."""
    from lorasched.tiny import tiny_sd_pipeline

    f = forge(lora_dir)
    f.shared.cmd_opts.lora_dir = str(lora_dir)
    f.networks.list_available_networks()
    pipe = tiny_sd_pipeline()
    return SimpleNamespace(forge=f, pipe=pipe, sd_model=TinySD(f, pipe), loras=lora_dir)


def make_files(folder: Path) -> SimpleNamespace:
    """lorasched files merged by lorasched from random kohya LoRAs on the tiny pipeline (text-encoder parts
    included): K-LoRA `s*` of a subject/style pair (layers that switch), and LoRA Switch over three sources (two
    subjects and a style taking turns of 2 of the 8 reference steps; layers a source does not adapt carry no LoRA
    on its turns)."""
    from lorasched.convert import MergeRequest, merge_loras
    from lorasched.merge import rules
    from lorasched.merge.checks import LoraSpec
    from lorasched.merge.lora import STYLE, SUBJECT
    from lorasched.tiny import random_kohya_lora, tiny_sd_pipeline
    from safetensors.torch import save_file

    pipe = tiny_sd_pipeline()
    base = folder / "base"
    pipe.save_pretrained(base)
    inputs = {"subject": (4, 2.0, 1, ("to_q", "to_k", "to_v", "to_out.0")),
              "subject2": (2, 1.0, 11, ("to_q", "to_v", "ff.net.2")),
              "style": (8, 3.0, 2, ("to_q", "to_k", "to_v", "ff.net.2"))}
    paths = {}
    for name, (rank, alpha, seed, targets) in inputs.items():
        paths[name] = str(folder / f"{name}.safetensors")
        save_file(random_kohya_lora(pipe, rank, alpha, seed=seed, targets=targets, text_encoder=True), paths[name])
    out = folder / "loras"
    out.mkdir(exist_ok=True)
    pair = [LoraSpec(paths["subject"], SUBJECT), LoraSpec(paths["style"], STYLE)]
    three = [LoraSpec(paths["subject"], SUBJECT), LoraSpec(paths["subject2"], SUBJECT, 0.8),
             LoraSpec(paths["style"], STYLE)]
    merge_loras(MergeRequest(str(base), tuple(pair), str(out / "klora.safetensors"), "klora",
                             rules.RuleOptions(pattern="s*"), steps=KLORA_STEPS, device="cpu"))
    merge_loras(MergeRequest(str(base), tuple(three), str(out / "switch3.safetensors"), "switch",
                             rules.RuleOptions(period=2), steps=KLORA_STEPS, device="cpu"))
    return SimpleNamespace(klora=out / "klora.safetensors", switch3=out / "switch3.safetensors", folder=folder,
                           inputs=paths)


class HandSetWeights:
    """The reference: a plain model whose UNet weights are set by hand, per step, to original + Σ active sources'
    deltas · strength, from lorasched's own reader (not the extension's) and Forge's key map."""

    def __init__(self, world: SimpleNamespace, path: Path, strength: float) -> None:
        from lorasched.merge import fileformat
        from lorasched.merge.replay import source_factors

        scheduled = fileformat.read(path, with_tensors=True)
        self.schedule = scheduled.schedule
        factors = source_factors(scheduled)
        model = world.sd_model.forge_objects_original.unet.model
        key_map = world.forge.model_lora_keys_unet(model, {})
        self.parameters = dict(model.named_parameters())
        self.parts = {}  # model key -> (layer, {source: ΔW · strength})
        for name, record in scheduled.modules.items():
            if name.startswith("unet."):
                deltas = {source: strength * (up.flatten(1) @ down.flatten(1))
                          for source, (down, up) in factors[name].items()}
                self.parts[key_map[record.key]] = (name, deltas)
        self.originals = {key: self.parameters[key].detach().clone() for key in self.parts}
        self.key_map = key_map

    @torch.no_grad()
    def add_plain(self, path: Path, strength: float) -> None:
        """A plain kohya LoRA under the schedule, by hand: strength · alpha / rank · up @ down on every weight."""
        from safetensors.torch import load_file

        tensors = load_file(path)
        for name in tensors:
            if name.startswith("lora_unet_") and name.endswith(".lora_up.weight"):
                key = name[: -len(".lora_up.weight")]
                up, down = tensors[name], tensors[f"{key}.lora_down.weight"]
                delta = strength * (float(tensors[f"{key}.alpha"]) / down.shape[0]) * (up @ down)
                target = self.originals.get(self.key_map[key], self.parameters[self.key_map[key]])
                target += delta.reshape(target.shape)

    @torch.no_grad()
    def set(self, time: float) -> None:
        for key, (name, deltas) in self.parts.items():
            weight = self.originals[key].clone()
            for source in self.schedule.active(name, time):
                weight += deltas[source].reshape(weight.shape)
            self.parameters[key].copy_(weight)


EVALS_PER_STEP = {"Euler": 1, "Heun": 2}  # model evaluations per step (the last, to sigma 0, takes one)


def reference(path: Path, prompt: str, strength: float, steps: int, sampler: str, seed: int = 0,
              plain: tuple[Path, float] | None = None, hires_steps: int | None = None) -> torch.Tensor:
    """Sample a fresh world without the file, its weights set by hand before each evaluation to the schedule at
    p = n / N of the evaluation's step (read off the sampler's structure, not its sigmas); `plain`: a kohya LoRA
    and its strength, added by hand to the weights underneath. The hires pass's steps are the last `hires_steps`
    of a schedule of hires_steps / DENOISE."""
    world = make_world(path.parent)
    weights = HandSetWeights(world, path, strength)
    if plain is not None:
        weights.add_plain(*plain)
    per_step = EVALS_PER_STEP[sampler]
    runs = [(0, steps, steps)] + ([(int(hires_steps / DENOISE) - hires_steps, hires_steps,
                                    int(hires_steps / DENOISE))] if hires_steps else [])
    calls = iter([(offset + n) / total for offset, run, total in runs
                  for n in range(run) for _ in range(per_step if n < run - 1 else 1)])

    def by_hand(p) -> None:
        def modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
            weights.set(next(calls))
            return model, x, timestep, uncond, cond, cond_scale, model_options, seed

        unet = p.sd_model.forge_objects.unet.clone()
        unet.add_conditioning_modifier(modifier)
        p.sd_model.forge_objects.unet = unet

    out = generate(world, prompt, steps, sampler, seed, script=False, before_sampling=by_hand,
                   hires_steps=hires_steps)
    assert next(calls, None) is None, f"{sampler} evaluated the model fewer times than EVALS_PER_STEP says"
    return out


def measure(steps: int = 20, repeats: int = 7, sampler: str = "Euler") -> dict:
    """Seconds per step of the tiny model's sampler run (`KDiffusionSampler.sample`: Forge's model load and LoRA
    merge, then every step) with the K-LoRA file replayed by the extension vs the same file as Forge's plain LoRA
    (its static mix), and without a LoRA: fastest of `repeats` rounds. The two LoRA runs alternate, so each starts
    from the other's weights and pays one merge, as a user switching between them would."""
    with tempfile.TemporaryDirectory() as folder:
        files = make_files(Path(folder))
        world = make_world(files.klora.parent)
        prompt = f"a photo <lora:{files.klora.stem}:1>"
        runs = {"replay": (prompt, True), "plain_lora": (prompt, False), "bare": ("a photo", False)}
        best = {name: float("inf") for name in runs}
        for index in range(repeats + 1):  # the first round warms up (file reads, caches)
            for name, (text, script) in runs.items():
                seconds: list[float] = []
                generate(world, text, steps, sampler, script=script, timings=seconds)
                if index:
                    best[name] = min(best[name], seconds[0])
    return {"steps": steps, "sampler": sampler, "seconds_per_step": {name: t / steps for name, t in best.items()},
            "replay_over_plain_lora": best["replay"] / best["plain_lora"]}
