"""An SDXL-topology UNet (random weights, channels scaled by `width`) and a random LoRA pair over the 722
modules a kohya SDXL LoRA covers (attention q/k/v/out, feed-forward, proj_in/out of every transformer)."""

from __future__ import annotations

import torch

KOHYA_SDXL_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def unet_config(width: float = 1.0) -> dict:
    """SDXL's UNet config with channels × width (rounded to 64, one attention head per 64 channels)."""
    c0 = max(64, 64 * round(5 * width))
    pooled = max(64, round(1280 * width))
    return dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(c0, 2 * c0, 4 * c0),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(c0 // 64, 2 * c0 // 64, 4 * c0 // 64),
        cross_attention_dim=max(64, round(2048 * width)),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=pooled + 6 * 256,
    )


def build_unet(width: float, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(width))
    # nn.Module.to: a plain cast, without diffusers' keep-in-fp32 warning (this UNet has no such modules)
    return torch.nn.Module.to(unet, dtype=dtype).eval()


def lora_targets(unet) -> list[tuple[str, torch.nn.Module]]:
    return [
        (name, module)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and ".attentions." in name and name.endswith(KOHYA_SDXL_TARGETS)
    ]


def random_kohya(targets, rank: int, seed: int, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """A kohya LoRA (diffusers-style names, alpha = rank / 2) with per-module random magnitudes."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in targets:
        key = "lora_unet_" + name.replace(".", "_")
        magnitude = float(torch.empty(1).log_normal_(0.0, 0.6, generator=generator))
        down = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
        up = torch.randn(module.out_features, rank, generator=generator) * magnitude * 0.02
        tensors[f"{key}.lora_down.weight"] = down.to(dtype)
        tensors[f"{key}.lora_up.weight"] = up.to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(rank / 2, dtype=dtype)
    return tensors


def save_base_configs(folder, width: float) -> None:
    """A diffusers folder with configs only (no weights): enough for `lorasched merge --base`."""
    import json
    from pathlib import Path

    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextConfig

    folder = Path(folder)
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "UNet2DConditionModel", **unet_config(width)}
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    EulerDiscreteScheduler().save_config(folder / "scheduler")
    for name, hidden in (("text_encoder", 768), ("text_encoder_2", 1280)):
        CLIPTextConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=hidden // 64,
                       intermediate_size=4 * hidden).save_pretrained(folder / name)
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "vae": [None, None],
        "tokenizer": [None, None],
        "tokenizer_2": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
