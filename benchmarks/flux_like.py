"""A FLUX.1-size base (configs only: 19 double-stream and 38 single-stream blocks, width 3072) and random
diffusers/PEFT-format LoRAs over the attention and feed-forward linears of every block (ai-toolkit's layout and
names), in bf16 like FLUX LoRAs are usually saved."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TRANSFORMER = dict(attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
                   num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1,
                   pooled_projection_dim=768)
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
           "ff_context.net.2", "proj_mlp", "proj_out")


def lora_targets() -> list[tuple[str, torch.nn.Linear]]:
    """The FLUX.1 transformer's adapted linears, built on the meta device (no memory)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**TRANSFORMER)
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith(blocks) and name.endswith(TARGETS)]


def random_peft(targets, rank: int, seed: int, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """`transformer.<module>.lora_A/B.weight` (no alphas: scale 1), a random magnitude per module."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in targets:
        magnitude = float(torch.empty(1).log_normal_(0.0, 0.6, generator=generator))
        down = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
        up = torch.randn(module.out_features, rank, generator=generator) * magnitude * 0.02
        tensors[f"transformer.{name}.lora_A.weight"] = down.to(dtype)
        tensors[f"transformer.{name}.lora_B.weight"] = up.to(dtype)
    return tensors


def save_base_configs(folder) -> None:
    """A FLUX.1 diffusers folder with the configs a merge reads (transformer, CLIP text encoder), no weights."""
    from transformers import CLIPTextConfig

    folder = Path(folder)
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "FluxTransformer2DModel", **TRANSFORMER}
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072).save_pretrained(folder / "text_encoder")
    index = {
        "_class_name": "FluxPipeline",
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": [None, None], "text_encoder_2": [None, None], "tokenizer": [None, None],
        "tokenizer_2": [None, None], "vae": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
