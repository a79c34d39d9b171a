"""Tiny worlds for the node's tests: lorasched files merged by lorasched from its tiny diffusers pipelines (format 2;
a golden format-1 file of the SD world's pair in tests/data), ComfyUI
models built by ComfyUI's own classes from those pipelines' state dicts (random weights, fixed seeds), and
conditioning for them.

ComfyUI's detection knows only real model sizes, so each builder converts the diffusers state dict with ComfyUI's
own converter, lets ComfyUI detect the config from the converted weights, and fills in only what the weights do not
say (SD: the head count; FLUX: the widths that detection hard-codes to FLUX.1's).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import comfy.model_detection
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils
import torch
from lorasched.convert import Calibration, MergeRequest, merge_loras
from lorasched.merge import rules
from lorasched.merge.checks import LoraSpec
from lorasched.merge.lora import STATIC, STYLE, SUBJECT
from lorasched.tiny import random_kohya_lora, tiny_flux_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline
from safetensors.torch import save_file

CPU = torch.device("cpu")
# lorasched 7b0e8e3's K-LoRA `s*` of tests/conftest.py's tiny_base and kohya_pair: the SD world's base and pair
FORMAT_1_FILE = Path(__file__).resolve().parents[1] / "data" / "format1-klora-s-star.safetensors"
KLORA_STEPS = 8  # the reference step count written into the files
FLUX_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "proj_mlp", "proj_out", "ff.net.2")
CLIP_VOCAB = 49408  # ComfyUI's CLIP text model always has the real vocabulary


def _patcher(model_config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> comfy.model_patcher.ModelPatcher:
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model(state_dict, "")
    model.load_model_weights(state_dict, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def comfy_unet(unet, dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """ComfyUI's SD1.5 model class, or SDXL's for a UNet with `text_time` conditioning, around a tiny diffusers
    UNet2DConditionModel's weights."""
    config = unet.config
    blocks = len(config.block_out_channels)
    per_block = config.transformer_layers_per_block
    per_block = [per_block] * blocks if isinstance(per_block, int) else list(per_block)
    depth = [layers if "CrossAttn" in kind else 0 for kind, layers in zip(config.down_block_types, per_block)]
    layout = {  # what ComfyUI's diffusers->LDM key map needs; output depths are listed shallow first, as ComfyUI pops
        "num_res_blocks": [config.layers_per_block] * blocks,
        "channel_mult": [width // config.block_out_channels[0] for width in config.block_out_channels],
        "transformer_depth": [d for d in depth for _ in range(config.layers_per_block)],
        "transformer_depth_output": [d for d in depth for _ in range(config.layers_per_block + 1)],
        "transformer_depth_middle": depth[-1],
    }
    names = comfy.utils.unet_to_diffusers(layout)
    state_dict = {names[key]: value for key, value in unet.state_dict().items()}
    unet_config = comfy.model_detection.detect_unet_config(state_dict, "")
    heads = config.attention_head_dim  # diffusers' SD1/SDXL `attention_head_dim` is the head count
    if config.addition_embed_type == "text_time":
        unet_config["num_head_channels"] = config.block_out_channels[-1] // heads[-1]
        return _patcher(comfy.supported_models.SDXL(unet_config), state_dict, dtype)
    unet_config["num_heads"] = heads
    return _patcher(comfy.supported_models.SD15(unet_config), state_dict, dtype)


def comfy_flux(transformer, dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """ComfyUI's FLUX model class around a tiny diffusers FluxTransformer2DModel's weights."""
    config = transformer.config
    # a copy: the converter writes FLUX's scale/shift swap into its input tensors in place
    state_dict = comfy.model_detection.convert_diffusers_mmdit(
        {key: value.clone() for key, value in transformer.state_dict().items()}, "")
    unet_config = comfy.model_detection.detect_unet_config(state_dict, "")
    unet_config.update(hidden_size=config.num_attention_heads * config.attention_head_dim,
                       num_heads=config.num_attention_heads, context_in_dim=config.joint_attention_dim,
                       axes_dim=list(config.axes_dims_rope), out_channels=unet_config["in_channels"])
    return _patcher(comfy.supported_models.Flux(unet_config), state_dict, dtype)


def comfy_clip(text_encoder) -> comfy.sd.CLIP:
    """ComfyUI's SD1 CLIP (detected from the state dict) around a tiny transformers CLIPTextModel's weights."""
    state_dict = {key if key.startswith("text_model.") else f"text_model.{key}": value
                  for key, value in text_encoder.state_dict().items()}
    embedding = state_dict["text_model.embeddings.token_embedding.weight"]
    state_dict["text_model.embeddings.token_embedding.weight"] = torch.cat(
        [embedding, embedding.new_zeros(CLIP_VOCAB - embedding.shape[0], embedding.shape[1])])
    config = text_encoder.config
    # SD1's CLIP has no projection; ComfyUI's model has one (unused for SD1): identity, not uninitialised memory
    state_dict["text_projection.weight"] = torch.eye(config.hidden_size)
    sizes = {name: getattr(config, name) for name in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                       "num_hidden_layers", "projection_dim", "hidden_act")}
    # ComfyUI reads a detected CLIP's size overrides from model_options["model_config"]
    return comfy.sd.load_text_encoder_state_dicts([state_dict], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                                  model_options={"model_config": sizes})


def peft_lora(module: torch.nn.Module, prefix: str, suffixes: tuple[str, ...], rank: int, seed: int) -> dict:
    """A random diffusers/PEFT-layout LoRA (`<prefix>.<module>.lora_A/B.weight`) over the linears ending in
    `suffixes`, each with its own magnitude so that K-LoRA has something to choose between."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.endswith(suffixes):
            magnitude = float(torch.empty(1).log_normal_(0.0, 0.6, generator=generator))
            tensors[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=generator) * 0.1
            tensors[f"{prefix}.{name}.lora_B.weight"] = (
                torch.randn(layer.out_features, rank, generator=generator) * 0.3 * magnitude)
    return tensors


def sd_conditioning(seed: int, width: int = 32) -> tuple[list, list]:
    """Random positive and negative cross-attention conditioning for the tiny SD UNet."""
    generator = torch.Generator().manual_seed(seed)
    return ([[torch.randn(1, 8, width, generator=generator), {}]],
            [[torch.randn(1, 8, width, generator=generator), {}]])


def sdxl_conditioning(seed: int, width: int = 32) -> tuple[list, list]:
    """Random context (both encoders' width) and pooled vector for the tiny SDXL UNet; ComfyUI adds the sizes."""
    generator = torch.Generator().manual_seed(seed)

    def cond():
        return [[torch.randn(1, 8, 2 * width, generator=generator),
                 {"pooled_output": torch.randn(1, width, generator=generator), "width": 64, "height": 64}]]

    return cond(), cond()


def flux_conditioning(seed: int, width: int = 32) -> tuple[list, list]:
    """Random T5-like context, pooled CLIP vector and distilled guidance for the tiny FLUX transformer."""
    generator = torch.Generator().manual_seed(seed)

    def cond():
        return [[torch.randn(1, 8, width, generator=generator),
                 {"pooled_output": torch.randn(1, width, generator=generator), "guidance": 3.5}]]

    return cond(), cond()


def _merge(base: Path, loras: tuple[Path, Path] | list[LoraSpec], output: Path, method: str = "klora",
           **options) -> Path:
    """`lorasched merge` on CPU of a (subject, style) pair or of LoraSpecs, K-LoRA by default, in the
    architecture's tensor format."""
    if isinstance(loras, tuple):
        loras = [LoraSpec(str(loras[0]), SUBJECT), LoraSpec(str(loras[1]), STYLE)]
    calibration = options.pop("calibration", Calibration())
    merge_loras(MergeRequest(str(base), tuple(loras), str(output), method, rules.RuleOptions(**options),
                             steps=KLORA_STEPS, device="cpu", calibration=calibration))
    return output


def make_sd_world(folder: Path) -> SimpleNamespace:
    """The tiny SD pipeline, a kohya subject/style pair with text-encoder parts (the style over other modules
    too), and lorasched files: K-LoRA `s`, K-LoRA `s*` and feature-kl (calibrated, noise axis)."""
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(folder / "base")
    pair = folder / "subject.safetensors", folder / "style.safetensors"
    save_file(random_kohya_lora(pipe, 4, 2.0, seed=1, text_encoder=True), pair[0])
    save_file(random_kohya_lora(pipe, 8, 3.0, seed=2, targets=("to_q", "to_k", "to_v", "ff.net.2"),
                                text_encoder=True), pair[1])
    calibration = Calibration(prompts=("a photo of sks dog",), seeds=(0, 1), size=32, guidance=5.0)
    files = {
        "klora-s": _merge(folder / "base", pair, folder / "klora_s.safetensors", pattern="s"),
        "klora-s*": _merge(folder / "base", pair, folder / "klora_sstar.safetensors", pattern="s*"),
        "feature-kl": _merge(folder / "base", pair, folder / "feature_kl.safetensors", "feature-kl",
                             calibration=calibration),
    }
    return SimpleNamespace(pipe=pipe, pair=pair, files=files, folder=folder)


def make_sd_sets(sd: SimpleNamespace, folder: Path) -> SimpleNamespace:
    """Format-2 files no pair makes, on the SD world: K-LoRA `s*` over two subjects (the world's and one at strength
    0.8 with text-encoder parts), its style and a static feed-forward LoRA at 0.7; LoRA Switch (turns of 2 of the 8
    reference steps) and windows with a gap (subjects on [0, 0.3), styles on [0.6, 1)) of the world's pair, which
    have phases where a layer carries no LoRA."""
    subject2, detail = folder / "subject2.safetensors", folder / "detail.safetensors"
    save_file(random_kohya_lora(sd.pipe, 2, 1.0, seed=11, text_encoder=True), subject2)
    save_file(random_kohya_lora(sd.pipe, 2, 0.5, seed=13, targets=("ff.net.2",)), detail)
    nway = [LoraSpec(str(sd.pair[0]), SUBJECT), LoraSpec(str(subject2), SUBJECT, 0.8),
            LoraSpec(str(sd.pair[1]), STYLE), LoraSpec(str(detail), STATIC, 0.7)]
    base = sd.folder / "base"
    files = {
        "nway": _merge(base, nway, folder / "nway.safetensors", pattern="s*"),
        "switch": _merge(base, sd.pair, folder / "switch.safetensors", "switch", period=2),
        "windows": _merge(base, sd.pair, folder / "windows.safetensors", "windows", windows=(0.3, 0.6)),
    }
    return SimpleNamespace(loras=nway, files=files, folder=folder)


def make_flux_world(folder: Path) -> SimpleNamespace:
    """The tiny FLUX pipeline, a PEFT subject/style pair over every block linear, and a K-LoRA `s*` file
    (diffusers tensor format, the default for FLUX)."""
    pipe = tiny_flux_pipeline()
    pipe.save_pretrained(folder / "base")
    pair = folder / "subject.safetensors", folder / "style.safetensors"
    save_file(peft_lora(pipe.transformer, "transformer", FLUX_TARGETS, rank=4, seed=1), pair[0])
    save_file(peft_lora(pipe.transformer, "transformer", FLUX_TARGETS[:8], rank=6, seed=2), pair[1])
    files = {"klora-s*": _merge(folder / "base", pair, folder / "klora_sstar.safetensors", pattern="s*")}
    return SimpleNamespace(pipe=pipe, pair=pair, files=files, folder=folder)


def make_sdxl_world(folder: Path) -> SimpleNamespace:
    """lorasched's tiny SDXL pipeline with a 256-wide size embedding (ComfyUI's SDXL class embeds sizes at 256,
    the tiny pipeline at 8), a kohya subject/style pair over the UNet, and a K-LoRA `s*` file, which lorasched
    writes under kohya sd-scripts' SGM block names (`lora_unet_input_blocks_…`)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    pipe = tiny_sdxl_pipeline()
    torch.manual_seed(0)
    time_width = 256
    unet = UNet2DConditionModel.from_config({
        **pipe.unet.config, "addition_time_embed_dim": time_width,
        "projection_class_embeddings_input_dim": pipe.text_encoder_2.config.projection_dim + 6 * time_width})
    pipe = StableDiffusionXLPipeline(**{**pipe.components, "unet": unet})
    pipe.save_pretrained(folder / "base")
    pair = folder / "subject.safetensors", folder / "style.safetensors"
    save_file(random_kohya_lora(pipe, 4, 2.0, seed=1), pair[0])
    save_file(random_kohya_lora(pipe, 8, 3.0, seed=2, targets=("to_q", "to_k", "to_v", "ff.net.2")), pair[1])
    files = {"klora-s*": _merge(folder / "base", pair, folder / "klora_sstar.safetensors", pattern="s*")}
    return SimpleNamespace(pipe=pipe, pair=pair, files=files, folder=folder)
