"""Tiny worlds for the node's tests: ComfyUI models built by ComfyUI's own classes from the state dicts of lorasched's
tiny diffusers pipelines (random weights, fixed seeds), and conditioning for them.

ComfyUI's detection knows only real model sizes, so each builder converts the diffusers state dict with ComfyUI's
own converter, lets ComfyUI detect the config from the converted weights, and fills in only what the weights do not
say (SD: the head count; FLUX: the widths that detection hard-codes to FLUX.1's).
"""

from __future__ import annotations

import comfy.model_detection
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils
import torch

CPU = torch.device("cpu")
CLIP_VOCAB = 49408  # ComfyUI's CLIP text model always has the real vocabulary


def _patcher(model_config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> comfy.model_patcher.ModelPatcher:
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model(state_dict, "")
    model.load_model_weights(state_dict, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def comfy_sd15(unet, dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """ComfyUI's SD1.5 model class around a tiny diffusers UNet2DConditionModel's weights."""
    config = unet.config
    layout = {  # what ComfyUI's diffusers->LDM key map needs to know
        "num_res_blocks": [config.layers_per_block] * len(config.block_out_channels),
        "channel_mult": [width // config.block_out_channels[0] for width in config.block_out_channels],
        "transformer_depth": [int("CrossAttn" in kind) for kind in config.down_block_types
                              for _ in range(config.layers_per_block)],
        "transformer_depth_output": [int("CrossAttn" in kind) for kind in config.up_block_types
                                     for _ in range(config.layers_per_block + 1)],
        "transformer_depth_middle": 1,
    }
    names = comfy.utils.unet_to_diffusers(layout)
    state_dict = {names[key]: value for key, value in unet.state_dict().items()}
    unet_config = comfy.model_detection.detect_unet_config(state_dict, "")
    unet_config["num_heads"] = config.attention_head_dim  # diffusers' SD1 `attention_head_dim` is the head count
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


def flux_conditioning(seed: int, width: int = 32) -> tuple[list, list]:
    """Random T5-like context, pooled CLIP vector and distilled guidance for the tiny FLUX transformer."""
    generator = torch.Generator().manual_seed(seed)

    def cond():
        return [[torch.randn(1, 8, width, generator=generator),
                 {"pooled_output": torch.randn(1, width, generator=generator), "guidance": 3.5}]]

    return cond(), cond()
