"""Tiny random-weight pipelines of every supported architecture, built in code (seeded, no downloads).

SD1.x, SDXL (two CLIP encoders, `text_embeds`/`time_ids` conditioning), FLUX.1 (`FluxTransformer2DModel`) and
SD3 (`SD3Transformer2DModel`), plus random kohya LoRAs for them. FLUX and SD3 get no tokenizers: they are driven
with precomputed prompt embeddings (`prompt_inputs`), which is all a test of the denoiser needs. The tests, the
demo and the benchmarks all build from here; `ARCHITECTURES` maps each name to its builder.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

TEXT_WIDTH = 32


def tiny_tokenizer():
    """A CLIP tokenizer over single characters, from a vocab written here (no download)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + ",.!":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab))
        Path(folder, "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(folder, "vocab.json")), str(Path(folder, "merges.txt")), model_max_length=77)


def tiny_sd_pipeline(seed: int = 0):
    """A StableDiffusionPipeline with tiny random UNet, VAE and CLIP text encoder (seeded)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=16,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=128,
            max_position_embeddings=77,
        )
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def random_kohya_lora(
    pipe,
    rank: int,
    alpha: float,
    seed: int,
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
    text_encoder: bool = False,
) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA over UNet linears whose names end with `targets` (and the CLIP attention projections if
    asked), each module with its own random magnitude so that selection rules have something to choose between.
    Text-encoder keys use kohya's `lora_te_text_model_…` names whatever the transformers version calls the module."""
    generator = torch.Generator().manual_seed(seed)
    parts = [("lora_unet_", pipe.unet, targets)]
    if text_encoder:
        parts.append(("lora_te_", pipe.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj")))
    tensors = {}
    for prefix, model, suffixes in parts:
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or not name.endswith(suffixes):
                continue
            if prefix == "lora_te_" and not name.startswith("text_model."):
                name = "text_model." + name
            key = prefix + name.replace(".", "_")
            magnitude = float(torch.empty(1).log_normal_(0.0, 0.6, generator=generator))
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.1
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * magnitude
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors


def _clip(with_projection: bool = False, hidden: int = TEXT_WIDTH):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=128, max_position_embeddings=77,
        projection_dim=hidden,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=128, d_model=TEXT_WIDTH, d_kv=8, d_ff=37, num_layers=1, num_heads=4))


def _vae(latent_channels: int, flow: bool = False):
    from diffusers import AutoencoderKL

    extra = {"shift_factor": 0.0609, "scaling_factor": 1.5035, "use_quant_conv": False,
             "use_post_quant_conv": False} if flow else {}
    return AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=16,
        **extra,
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """StableDiffusionXLPipeline: a two-level UNet with `text_time` added conditioning and LoCon-able convs."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, norm_num_groups=16,
        projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * 8, cross_attention_dim=2 * TEXT_WIDTH,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        unet=unet, vae=_vae(4), text_encoder=_clip(), text_encoder_2=_clip(with_projection=True),
        tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
    )


def tiny_flux_pipeline(seed: int = 0):
    """FluxPipeline: one double-stream and two single-stream blocks, guidance embedding on (FLUX.1-dev layout)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=True, axes_dims_rope=[4, 4, 8],
    )
    return FluxPipeline(
        transformer=transformer, vae=_vae(4, flow=True), text_encoder=_clip(), text_encoder_2=_t5(),
        tokenizer=None, tokenizer_2=None, scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def tiny_sd3_pipeline(seed: int = 0):
    """StableDiffusion3Pipeline: a two-block MMDiT with joint attention and `context_pre_only` last block."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=TEXT_WIDTH, joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=2 * TEXT_WIDTH,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=_vae(4, flow=True), text_encoder=_clip(with_projection=True),
        text_encoder_2=_clip(with_projection=True), text_encoder_3=_t5(), tokenizer=None, tokenizer_2=None,
        tokenizer_3=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


ARCHITECTURES = {"sd1": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "flux": tiny_flux_pipeline,
                 "sd3": tiny_sd3_pipeline}


def prompt_inputs(pipe, seed: int = 1) -> dict:
    """Keyword arguments that condition `pipe` without tokenizers: random prompt embeddings of the right shapes."""
    name = type(pipe).__name__
    generator = torch.Generator().manual_seed(seed)
    dtype = next(pipe.text_encoder.parameters()).dtype

    def embeds(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    if name == "FluxPipeline":
        return {"prompt_embeds": embeds(1, 8, TEXT_WIDTH), "pooled_prompt_embeds": embeds(1, TEXT_WIDTH)}
    if name == "StableDiffusion3Pipeline":
        return {"prompt_embeds": embeds(1, 8, TEXT_WIDTH), "pooled_prompt_embeds": embeds(1, 2 * TEXT_WIDTH)}
    return {"prompt": "a photo of sks dog"}


def generate(pipe, steps: int, seed: int = 0) -> torch.Tensor:
    """Latents of a short seeded run at 32×32 pixels (FLUX: 16×16 latents packed 2×2), any architecture."""
    extra = {"guidance_scale": 1.0} if type(pipe).__name__ == "StableDiffusion3Pipeline" else {}
    return pipe(
        **prompt_inputs(pipe), num_inference_steps=steps, height=32, width=32, output_type="latent",
        generator=torch.Generator().manual_seed(seed), **extra,
    ).images


def save_sd_configs(folder: str | Path, version: str = "sd15") -> Path:
    """A configs-only diffusers folder of real SD1.5 (`sd15`) or SD2.1-base (`sd21`) size: the base real LoRA
    files fit. No weights are written; `lorasched merge --base` only reads configs."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextConfig

    folder = Path(folder)
    sd2 = version == "sd21"
    unet = dict(cross_attention_dim=1024 if sd2 else 768, attention_head_dim=(5, 10, 20, 20) if sd2 else 8,
                use_linear_projection=sd2, sample_size=64)
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **unet}))
    EulerDiscreteScheduler(steps_offset=1).save_config(folder / "scheduler")
    hidden = 1024 if sd2 else 768
    CLIPTextConfig(hidden_size=hidden, num_hidden_layers=23 if sd2 else 12, num_attention_heads=hidden // 64,
                   intermediate_size=4 * hidden, projection_dim=hidden).save_pretrained(folder / "text_encoder")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "vae": [None, None], "tokenizer": [None, None], "safety_checker": [None, None],
             "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def save_tiny_vit(folder: str | Path, seed: int = 0) -> Path:
    """A random ViT image embedder (DINO's architecture at 32 px) with its image processor, saved as a folder
    usable as `--embedder` / `--dino`."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return Path(folder)


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A random CLIP (image and text towers at 32 px / 32 wide, the character tokenizer) with its processor,
    saved as a folder usable as `--clip`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tower = {"hidden_size": TEXT_WIDTH, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": 128, "max_position_embeddings": 77, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer()).save_pretrained(folder)
    return Path(folder)
