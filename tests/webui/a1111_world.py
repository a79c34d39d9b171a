"""A tiny AUTOMATIC1111 1.10: the vendored Lora extension and sampling stack around a tiny SD1 model, with only the
WebUI shell stubbed (modules.shared, sd_models, cache/hashes, the UI packages, the parts of the sampler registry that
import the whole WebUI).

What runs for real: the built-in Lora extension (`<lora:NAME:S>` parsed by `modules.extra_networks`,
`ExtraNetworkLora.activate` -> `networks.load_networks` -> `load_network` and its `module_types`, torch.nn.Linear /
Conv2d / GroupNorm / LayerNorm / MultiheadAttention patched by `lora_patches.LoraPatches` as `lora_script.py` does,
`network_apply_weights` and its weights backup), `modules.script_callbacks`, and A1111's sampler:
`KDiffusionSampler.sample` -> k-diffusion's `sample_euler` / `sample_heun` -> `CFGDenoiser.forward`, which calls
`on_cfg_denoiser` before each evaluation, -> k-diffusion's `CompVisDenoiser` -> the model's `apply_model`; and the
extension's own Script (scripts/lorasched.py, loaded as the WebUI loads it). `generate` plays
`processing.process_images_inner` for one image in its order (parse the prompt's extra networks, activate them, the
Script's `process_batch`, encode the prompts, its `process_before_every_sampling`, sample, deactivate).

The model stands for ldm's LatentDiffusion (not vendored): lorasched's tiny diffusers UNet and CLIP text encoder,
with `apply_model` / `get_learned_conditioning` as A1111 calls them. The host's own
`assign_network_names_to_compvis_modules` names the text encoder (transformer.text_model.…, as A1111's
FrozenCLIPEmbedder); UNet layers get the compvis names A1111 would give the LDM UNet, through the networks.py
kohya->compvis mapping (`convert_diffusers_name_to_compvis`) of each diffusers module.

k-diffusion is the PyPI package; its `__init__` imports its training tools (skimage, kornia, clean-fid, wandb …),
so the package is entered without it, as A1111 only imports `k_diffusion.sampling` and `k_diffusion.external`.
`Host.open` / `close` install and remove all of it (sys.modules, torch patches), so other hosts' `modules` can be
imported in the same process before or after.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from broken_files import rewritten
from shell import Options

REPO = Path(__file__).resolve().parents[2]
A1111 = REPO.parent / "shared" / "vendor" / "A1111"
LORA_EXTENSION = A1111 / "extensions-builtin" / "Lora"
EXTENSION = REPO / "sd-webui-lorasched"
KLORA_STEPS = 8  # the reference step count written into the files
CFG = 5.0
DENOISE = 0.5  # the hires pass's denoising strength
LATENT = (1, 4, 16, 16)  # the tiny pipeline's 32x32 images
EVALS_PER_STEP = {"Euler": 1, "Heun": 2}  # model evaluations per step, the last step one (read off k-diffusion)
OWNED = ("modules", "k_diffusion", "gradio", "fastapi", "network", "networks", "network_", "lora", "lora_",
         "lyco_helpers", "extra_networks_lora", "lorasched_webui.a1111", "lorasched_webui.runs")

# A1111's defaults of the options the exercised code reads; an option not listed is missing (`getattr(opts, x, d)`).
OPTIONS = {
    "lora_functional": False, "lora_in_memory_limit": 0, "lora_not_found_warning_console": False,
    "lora_not_found_gradio_warning": False, "lora_bundled_ti_to_infotext": True,
    "lora_preferred_name": "Alias from file", "lora_add_hashes_to_infotext": True, "sd_lora": "None",
    "extra_networks_default_multiplier": 1.0, "skip_early_cond": 0.0, "s_min_uncond_all": False,
    "pad_cond_uncond": False, "pad_cond_uncond_v0": False, "batch_cond_uncond": True,
    "live_preview_content": "Prompt", "live_previews_enable": False, "show_progress_every_n_steps": 10,
    "refiner_switch_by_sample_steps": False, "always_discard_next_to_last_sigma": False,
    "use_old_karras_scheduler_sigmas": False, "sigma_min": 0.0, "sigma_max": 0.0, "rho": 0.0,
    "sgm_noise_multiplier": False, "enable_quantization": False, "eta_ancestral": 1.0,
    "no_dpmpp_sde_batch_determinism": False, "list_hidden_files": True, "img2img_extra_noise": 0.0,
    "img2img_fix_steps": False,
}


def walk_files(path: str, allowed_extensions=None):
    """`modules.util.walk_files`: every file under `path` with an allowed extension."""
    if not os.path.exists(path):
        return
    for root, _, files in os.walk(path, followlinks=True):
        for filename in sorted(files):
            if allowed_extensions is None or os.path.splitext(filename)[1] in allowed_extensions:
                yield os.path.join(root, filename)


def read_metadata_from_safetensors(filename: str) -> dict:
    """`sd_models.read_metadata_from_safetensors`: the header's metadata, JSON-object values parsed."""
    with safe_open(filename, "pt") as handle:
        metadata = dict(handle.metadata() or {})
    for key, value in metadata.items():
        if value[:1] == "{":
            try:
                metadata[key] = json.loads(value)
            except json.JSONDecodeError:
                pass
    return metadata


def file_sha256(filename: str, *args, **kwargs) -> str:
    """`hashes.sha256` (without its cache)."""
    return hashlib.sha256(Path(filename).read_bytes()).hexdigest()


# modules/patches.py of A1111 1.10 (not vendored), verbatim in behaviour: what lora_patches.py patches torch.nn with.
def _patch(key, obj, field, replacement):
    patch_key = (obj, field)
    if patch_key in _patches.setdefault(key, {}):
        raise RuntimeError(f"patch for {field} is already applied")
    original = getattr(obj, field)
    _patches[key][patch_key] = original
    setattr(obj, field, replacement)
    return original


def _undo(key, obj, field):
    patch_key = (obj, field)
    if patch_key not in _patches.get(key, {}):
        raise RuntimeError(f"there is no patch for {field} to undo")
    setattr(obj, field, _patches[key].pop(patch_key))


_patches: dict = {}


class EmbeddingDatabase(SimpleNamespace):
    """`sd_hijack.model_hijack.embedding_db`, for files without bundled embeddings."""

    def __init__(self) -> None:
        super().__init__(word_embeddings={}, skipped_embeddings={}, expected_shape=-1)

    def register_embedding(self, embedding, model) -> None:
        self.word_embeddings[embedding.name] = embedding

    def register_embedding_by_name(self, embedding, model, name) -> None:
        pass


def _reconstruct_multicond_batch(c, current_step):
    """`prompt_parser.reconstruct_multicond_batch` for plain prompts (no AND, no prompt editing)."""
    return [[(index, 1.0)] for index in range(c.shape[0])], c


class Host:
    """The vendored A1111 with the shell stubbed; `open` installs it into this process, `close` removes it."""

    def __init__(self, lora_dir: Path) -> None:
        self.lora_dir = lora_dir
        self.saved: dict[str, types.ModuleType] = {}
        self.path = [str(LORA_EXTENSION), str(EXTENSION), str(Path(__file__).resolve().parent)]

    def open(self) -> "Host":
        assert not any(name.startswith("lorasched_webui.a1111") for name in sys.modules), "an A1111 host is open"
        sys.dont_write_bytecode = True  # the vendored tree is read-only in CI
        torch.set_num_threads(1)  # tiny models gain nothing from intra-op threads; a shared 2-core host loses a lot
        self.saved = {name: sys.modules.pop(name) for name in list(sys.modules) if _owned(name)}
        sys.path[:0] = self.path
        try:
            self._install()
        except BaseException:
            self.close()
            raise
        return self

    def _install(self) -> None:
        self._stub_shell()
        import torchsde._brownian.brownian_interval as brownian

        self.brownian, self.randn = brownian, brownian._randn  # sd_samplers_common replaces it at import
        from modules import devices, shared, shared_state

        devices.device = devices.cpu
        devices.dtype = devices.dtype_vae = devices.dtype_unet = devices.dtype_inference = torch.float32
        shared.state = shared_state.State()
        from modules import extra_networks, script_callbacks, sd_samplers_kdiffusion
        import extra_networks_lora
        import lora_patches
        import network_lora
        import networks

        networks.originals = lora_patches.LoraPatches()  # what scripts/lora_script.py does at load
        networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()  # and its before_ui
        extra_networks.register_extra_network(networks.extra_network_lora)
        extra_networks.register_extra_network_alias(networks.extra_network_lora, "lyco")
        from extension import load_script
        from lorasched_webui import host

        host.cache_clear()
        assert host().__name__ == "lorasched_webui.a1111", (
            "another WebUI's packages are importable in this process: run each host's tests in a process of its own")
        self.script = load_script()  # the extension's Script, as the WebUI loads it (it calls a1111.setup())
        from lorasched_webui import a1111

        self.shared, self.networks, self.network_lora = shared, networks, network_lora
        self.extra_networks, self.script_callbacks = extra_networks, script_callbacks
        self.samplers, self.a1111 = sd_samplers_kdiffusion, a1111

    def close(self) -> None:
        networks = sys.modules.get("networks")
        if getattr(networks, "originals", None) is not None:
            networks.originals.undo()
        _patches.clear()
        if hasattr(self, "brownian"):
            self.brownian._randn = self.randn
        for name in [name for name in sys.modules if _owned(name)]:
            del sys.modules[name]
        sys.modules.update(self.saved)
        package = sys.modules.get("lorasched_webui")
        if package is not None:
            package.host.cache_clear()  # the next host to open picks its own module
            if hasattr(package, "a1111"):
                del package.a1111
        for entry in self.path:
            sys.path.remove(entry)

    def _stub_shell(self) -> None:
        modules = _package("modules", [str(A1111 / "modules")])
        shared = _stub("modules.shared", opts=Options(OPTIONS), sd_model=None, device=torch.device("cpu"),
                       cmd_opts=SimpleNamespace(lora_dir=str(self.lora_dir), lyco_dir_backcompat=str(self.lora_dir),
                                                use_ipex=False, use_cpu=[], device_id=None, disable_nan_check=True),
                       parallel_processing_allowed=True, walk_files=walk_files,
                       total_tqdm=SimpleNamespace(update=lambda: None))
        _stub("modules.util", walk_files=walk_files, topological_sort=lambda dependencies: list(dependencies))
        _stub("modules.extensions", find_extension=lambda filename: None, extensions=[])
        _stub("modules.npu_specific", has_npu=False, torch_npu_gc=lambda: None)
        _stub("modules.patches", patch=_patch, undo=_undo, original=lambda key, obj, field: None)
        _stub("modules.sd_models", read_metadata_from_safetensors=read_metadata_from_safetensors,
              read_state_dict=lambda filename, *args, **kwargs: load_file(filename))
        _stub("modules.cache", cached_data_for_file=lambda subsection, title, filename, func: func())
        _stub("modules.hashes", sha256_from_cache=lambda *args, **kwargs: None, sha256=file_sha256)
        _stub("modules.sd_hijack", model_hijack=SimpleNamespace(embedding_db=EmbeddingDatabase(), comments=[],
                                                                extra_generation_params={}))
        _package("modules.textual_inversion")
        _stub("modules.textual_inversion.textual_inversion", create_embedding_from_data=None)
        _package("modules.models")
        _package("modules.models.sd3")
        _stub("modules.models.sd3.mmdit", QkvLinear=type("QkvLinear", (torch.nn.Linear,), {}))
        _stub("modules.prompt_parser", reconstruct_multicond_batch=_reconstruct_multicond_batch,
              reconstruct_cond_batch=lambda c, current_step: c)
        _stub("modules.sd_samplers", find_sampler_config=lambda name: None)
        _stub("modules.sd_samplers_extra", restart_sampler=lambda *args, **kwargs: None)
        _stub("modules.sd_schedulers", schedulers=[], schedulers_map={})
        for name in ("modules.images", "modules.sd_vae_approx", "modules.sd_vae_taesd", "modules.scripts"):
            _stub(name)
        _stub("gradio", Blocks=object, Warning=print)
        _stub("fastapi", FastAPI=object)
        k_diffusion = importlib.metadata.distribution("k-diffusion").locate_file("k_diffusion")
        _package("k_diffusion", [str(k_diffusion)])
        for name in ("sampling", "external"):  # what its __init__ would import that A1111 uses
            importlib.import_module(f"k_diffusion.{name}")
        assert modules is sys.modules["modules"] and shared is sys.modules["modules.shared"]


def _owned(name: str) -> bool:
    return any(name == owned or name.startswith(owned if owned.endswith("_") else owned + ".")
               for owned in OWNED)


def _stub(name: str, **attributes) -> types.ModuleType:
    """A stand-in module, registered as the real one would be (in sys.modules and on its parent package)."""
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def _package(name: str, path: list[str] | None = None) -> types.ModuleType:
    """A package whose submodules are imported from `path` without running an `__init__`."""
    package = _stub(name)
    package.__path__ = path or []
    return package


class TextEncoder(torch.nn.Module):
    """The role of A1111's FrozenCLIPEmbedder: CLIP under `transformer.text_model.…` (transformers 4's naming,
    which transformers 5's CLIPTextModel no longer has)."""

    def __init__(self, clip, tokenizer) -> None:
        super().__init__()
        self.clip = [clip]  # kept out of the module tree, which is the `transformer` below
        self.transformer = clip if hasattr(clip, "text_model") else torch.nn.Module()
        if self.transformer is not clip:
            self.transformer.text_model = clip
        self.tokenizer = tokenizer

    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return self.clip[0](input_ids=ids.input_ids).last_hidden_state


class DiffusionWrapper(torch.nn.Module):
    """ldm's DiffusionWrapper for cross-attention conditioning."""

    conditioning_key = "crossattn"

    def __init__(self, unet) -> None:
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x, t, c_crossattn, c_concat=None):
        return self.diffusion_model(x, t, encoder_hidden_states=torch.cat(c_crossattn, 1)).sample


class TinyModel(torch.nn.Module):
    """What A1111 reads of ldm's LatentDiffusion for an SD1 eps model: `model.diffusion_model`,
    `cond_stage_model`, `alphas_cumprod`, `apply_model`, `get_learned_conditioning`."""

    parameterization = "eps"
    cond_stage_key = "txt"
    is_sdxl = is_sd2 = is_sdxl_inpaint = False
    is_sd1 = True
    latent_channels = 4
    sd_checkpoint_info = None

    def __init__(self, pipe) -> None:
        super().__init__()
        self.model = DiffusionWrapper(copy.deepcopy(pipe.unet).eval())
        self.cond_stage_model = TextEncoder(copy.deepcopy(pipe.text_encoder).eval(), pipe.tokenizer)
        config = pipe.scheduler.config
        betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_train_timesteps,
                               dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, 0).float())
        self.requires_grad_(False)

    def apply_model(self, x, t, cond):
        return self.model(x, t, **cond)

    def get_learned_conditioning(self, prompts: list[str]) -> torch.Tensor:
        return self.cond_stage_model(prompts)

    def layer(self, name: str) -> torch.nn.Module:
        """A layer by its lorasched (diffusers pipeline) name."""
        component, path = name.split(".", 1)
        if component == "unet":
            return self.model.diffusion_model.get_submodule(path)
        clip = self.cond_stage_model.clip[0]
        return clip.get_submodule(path if hasattr(clip, "text_model") else path.removeprefix("text_model."))


def host_model(host: Host, pipe) -> TinyModel:
    """A model as A1111 holds a loaded checkpoint: every layer named for networks (`network_layer_name`)."""
    model = TinyModel(pipe)
    host.shared.sd_model = model
    networks = host.networks
    networks.assign_network_names_to_compvis_modules(model)  # the text encoder's names, as the host gives them
    mapping = model.network_layer_mapping
    for name, module in model.model.diffusion_model.named_modules():
        mapping.pop(module.network_layer_name, None)
        compvis = networks.convert_diffusers_name_to_compvis("lora_unet_" + name.replace(".", "_"), False)
        if compvis.startswith("diffusion_model_"):  # the LDM UNet's name of this layer
            module.network_layer_name = compvis
            mapping[compvis] = module
        else:
            del module.network_layer_name
    return model


class Generator:
    """`p.rng` (modules.rng.ImageRNG): the noise k-diffusion's samplers draw with `torch.randn_like`."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        return torch.randn(LATENT, generator=self.generator)


def processing(prompt: str, negative: str, steps: int, sampler: str, seed: int) -> SimpleNamespace:
    """The fields of StableDiffusionProcessingTxt2Img that the exercised code reads and writes."""
    p = SimpleNamespace(
        prompt=prompt, all_prompts=[prompt], prompts=[prompt], negative_prompts=[negative], steps=steps,
        sampler_name=sampler, cfg_scale=CFG, seeds=[seed], iteration=0, extra_generation_params={}, comments={},
        is_hr_pass=False, scheduler=None, hr_scheduler=None, sampler_noise_scheduler_override=None, eta=None,
        s_min_uncond=0.0, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, refiner_checkpoint_info=None,
        refiner_switch_at=None, scripts=None, rng=Generator(seed + 1))
    p.comment = lambda text: p.comments.setdefault(text, 1)
    return p


def generate(host: Host, model: TinyModel, prompt: str, steps: int, sampler: str = "Euler", seed: int = 0,
             negative: str = "", enabled: bool = True, hires_steps: int | None = None) -> torch.Tensor:
    """One txt2img image's latent, in process_images_inner's order: extra networks from the prompt, activate, the
    Script's process_batch, encode prompts, its process_before_every_sampling, A1111's k-diffusion sampler
    (CFGDenoiser -> on_cfg_denoiser each evaluation), deactivate. `enabled`: the Script's accordion.
    `hires_steps`: a latent-upscale hires pass of that many steps as `sample_hr_pass` runs it (a new sampler, the
    Script's process_before_every_sampling again, `sample_img2img` at DENOISE)."""
    host.shared.sd_model = model
    p = processing(prompt, negative, steps, sampler, seed)
    p.prompts, extra_network_data = host.extra_networks.parse_prompts(p.prompts)
    host.extra_networks.activate(p, extra_network_data)
    host.script.process_batch(p, enabled)
    with torch.no_grad():
        cond = model.get_learned_conditioning(p.prompts)
        uncond = model.get_learned_conditioning(p.negative_prompts)
        config = host.samplers.k_diffusion_samplers_map[sampler]
        kdiffusion = config.constructor(model)  # what sd_samplers.create_sampler does
        kdiffusion.config = config
        noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(seed))
        host.script.process_before_every_sampling(p, enabled)
        start = time.perf_counter()
        latent = kdiffusion.sample(p, noise, cond, uncond, image_conditioning=noise.new_zeros(LATENT[0], 5, 1, 1))
        host.sampling_s = time.perf_counter() - start
        if hires_steps:
            p.is_hr_pass, p.hr_second_pass_steps, p.denoising_strength = True, hires_steps, DENOISE
            upscaled = torch.nn.functional.interpolate(latent, scale_factor=2, mode="nearest")
            hires = config.constructor(model)
            hires.config = config
            host.script.process_before_every_sampling(p, enabled)
            noise = torch.randn(upscaled.shape, generator=torch.Generator().manual_seed(seed + 1))
            latent = hires.sample_img2img(p, upscaled, noise, cond, uncond, steps=hires_steps,
                                          image_conditioning=noise.new_zeros(LATENT[0], 5, 1, 1))
    host.extra_networks.deactivate(p, extra_network_data)
    host.last_processing = p  # for its infotext and comments
    return latent


class HandSetWeights:
    """The reference: a model's scheduled weights written by hand, with plain torch, as original + strength x the
    sum of the active sources' deltas, the file read by lorasched itself (not through the extension)."""

    def __init__(self, model: TinyModel, path: Path, strength: float) -> None:
        from lorasched.merge import fileformat
        from lorasched.merge.replay import source_factors

        scheduled = fileformat.read(path, with_tensors=True)
        self.schedule = scheduled.schedule
        self.parts = {}  # name -> (weight, original, {source: strength x ΔW})
        for name, factors in source_factors(scheduled).items():
            weight = model.layer(name).weight
            self.parts[name] = (weight, weight.detach().clone(), {
                source: strength * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
                for source, (down, up) in factors.items()})

    def set(self, time: float, denoiser: bool) -> None:
        with torch.no_grad():
            for name, (weight, original, deltas) in self.parts.items():
                if name.startswith("unet.") == denoiser:
                    weight.copy_(original + sum((deltas[source] for source in self.schedule.active(name, time)),
                                                torch.zeros_like(original)))

    def restore(self) -> None:
        with torch.no_grad():
            for weight, original, _ in self.parts.values():
                weight.copy_(original)


def evaluation_times(axis: str, steps: int, sampler: str, hires_steps: int | None = None) -> list[float]:
    """Each model evaluation's time on `axis`, from the sampler's structure (EVALS_PER_STEP): p = n / N of its step
    n; on the noise axis q = 1 - t / 1000 of its sigma, which for A1111's default schedule of these samplers is
    k-diffusion's `get_sigmas(N)` at t = linspace(999, 0, N)[n] (Heun's second evaluation: the next step's).
    The hires pass (progress axis): its steps are the last `hires_steps` of a schedule of hires_steps / DENOISE."""
    grid = torch.linspace(999, 0, steps, dtype=torch.float64).tolist()
    per_step = EVALS_PER_STEP[sampler]
    times = [n / steps if axis == "progress" else 1.0 - grid[n + k] / 1000.0
             for n in range(steps) for k in range(per_step if n < steps - 1 else 1)]
    if hires_steps:
        assert axis == "progress"
        total = int(hires_steps / DENOISE)
        times += [(total - hires_steps + n) / total
                  for n in range(hires_steps) for _ in range(per_step if n < hires_steps - 1 else 1)]
    return times


def reference(host: Host, model: TinyModel, path: Path, strength: float, prompt: str, steps: int,
              sampler: str = "Euler", seed: int = 0, hires_steps: int | None = None) -> torch.Tensor:
    """`generate` without the file on an un-named model whose weights are set by hand: the text encoder's at time
    0, the UNet's before each evaluation at that evaluation's time (`evaluation_times`)."""
    weights = HandSetWeights(model, path, strength)
    times = iter(evaluation_times(weights.schedule.axis, steps, sampler, hires_steps))

    def set_weights(params) -> None:
        weights.set(next(times), denoiser=True)

    weights.set(0.0, denoiser=False)
    host.script_callbacks.on_cfg_denoiser(set_weights, name="reference")
    try:
        latent = generate(host, model, prompt, steps, sampler, seed, hires_steps=hires_steps)
    finally:
        host.script_callbacks.remove_callbacks_for_function(set_weights)
        weights.restore()
    assert next(times, None) is None, f"{sampler} evaluated the model fewer times than EVALS_PER_STEP says"
    return latent


def make_files(folder: Path) -> SimpleNamespace:
    """The tiny SD pipeline, kohya LoRAs with text-encoder parts, and lorasched files merged by lorasched: K-LoRA
    `s*` of a subject/style pair (switching layers), feature-kl of the pair (calibrated, on the noise axis), and two
    N-way files over two subjects and a style, LoRA Switch (turns of 2 of the 8 reference steps) and windows with
    a gap (subjects on [0, 0.3), the style on [0.6, 1)), with phases where a layer carries no LoRA; `plain`: the
    K-LoRA file without its lorasched metadata."""
    from lorasched.convert import Calibration, MergeRequest, merge_loras
    from lorasched.merge import rules
    from lorasched.merge.checks import LoraSpec
    from lorasched.merge.lora import STYLE, SUBJECT
    from lorasched.tiny import random_kohya_lora, tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    base = folder / "base"
    pipe.save_pretrained(base)
    subject, subject2, style = (folder / f"{name}.safetensors" for name in ("subject", "subject2", "style"))
    save_file(random_kohya_lora(pipe, 4, 2.0, seed=1, text_encoder=True), subject)
    save_file(random_kohya_lora(pipe, 2, 1.0, seed=11, text_encoder=True), subject2)
    save_file(random_kohya_lora(pipe, 8, 3.0, seed=2, targets=("to_q", "to_k", "to_v", "ff.net.2"),
                                text_encoder=True), style)
    pair = [LoraSpec(str(subject), SUBJECT), LoraSpec(str(style), STYLE)]
    nway = [LoraSpec(str(subject), SUBJECT), LoraSpec(str(subject2), SUBJECT, 0.8), LoraSpec(str(style), STYLE)]

    def merge(name: str, loras: list, method: str, calibration: Calibration = Calibration(), **options) -> Path:
        output = folder / f"{name}.safetensors"
        merge_loras(MergeRequest(str(base), tuple(loras), str(output), method, rules.RuleOptions(**options),
                                 steps=KLORA_STEPS, device="cpu", calibration=calibration))
        return output

    files = {
        "klora": merge("klora", pair, "klora", pattern="s*"),
        "feature-kl": merge("feature-kl", pair, "feature-kl", Calibration(
            prompts=("a photo of sks dog",), seeds=(0, 1), size=32, guidance=CFG)),
        "switch3": merge("switch3", nway, "switch", period=2),
        "windows3": merge("windows3", nway, "windows", windows=(0.3, 0.6)),
    }
    plain = rewritten(files["klora"], folder / "plain.safetensors", plain=True)
    return SimpleNamespace(pipe=pipe, files=files, plain=plain)


def measure(steps: int = 20, repeats: int = 5, sampler: str = "Euler", host: Host | None = None) -> dict:
    """Step time of the tiny model sampling with the K-LoRA file replayed vs the same file as a plain LoRA (its
    static mix, merged by A1111 once): the sampler's run (the clock and the switches' re-merges included; the
    file's load and the text encoder not) over its steps, each timed in turns, fastest of `repeats` runs. On
    `host` if one is open (the files join its Lora folder), else on a host of its own."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        made = make_files(folder)
        own = host is None
        if own:
            host = Host(folder / "Lora")
            host.lora_dir.mkdir()
        names = {"replay": "measure_klora", "plain": "measure_plain"}
        for kind, path in (("replay", made.files["klora"]), ("plain", made.plain)):
            shutil.copy(path, host.lora_dir / f"{names[kind]}.safetensors")
        if own:
            host.open()
        try:
            model = host_model(host, made.pipe)
            times = {kind: [] for kind in names}
            for _ in range(repeats + 1):  # the first round warms up (file loads, backups)
                for kind, name in names.items():
                    generate(host, model, f"a photo <lora:{name}:1>", steps, sampler)
                    times[kind].append(host.sampling_s)
        finally:
            for name in names.values():
                (host.lora_dir / f"{name}.safetensors").unlink()
            if own:
                host.close()
    replay, plain = min(times["replay"][1:]), min(times["plain"][1:])
    return {"host": "A1111 1.10", "sampler": sampler, "steps": steps, "repeats": repeats,
            "replay_step_s": replay / steps, "plain_step_s": plain / steps, "ratio": replay / plain}
