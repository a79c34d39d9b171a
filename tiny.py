"""Tiny random-weight pipelines of every supported architecture, built in code (seeded, no downloads).

SD1.x lives in `demo.tiny_sd_pipeline`; here are SDXL (two CLIP encoders, `text_embeds`/`time_ids`
conditioning), FLUX.1 (`FluxTransformer2DModel`) and SD3 (`SD3Transformer2DModel`). FLUX and SD3 get no
tokenizers: they are driven with precomputed prompt embeddings (`transformer_inputs`), which is all a test of
the denoiser needs. `ARCHITECTURES` maps each name to its builder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from demo import _tokenizer, tiny_sd_pipeline

TEXT_WIDTH = 32


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
        tokenizer=_tokenizer(), tokenizer_2=_tokenizer(), scheduler=scheduler, force_zeros_for_empty_prompt=False,
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


def save_base(architecture: str, folder: str | Path) -> Path:
    """Save a tiny pipeline as a diffusers folder, usable as `--base`."""
    ARCHITECTURES[architecture]().save_pretrained(folder)
    return Path(folder)


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
    import json

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
