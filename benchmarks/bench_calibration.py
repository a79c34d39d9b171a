"""Calibration cost on a pipeline the size of SD1.5 (random weights: full-size UNet, CLIP text encoder and VAE)
with a random rank-16 kohya pair over its attention and feed-forward linears: the feature-kl calibration
(balance run + prompts × seeds, batched, with its progress bar) against the same passes without any LoRA.
Uses `cuda` (fp16) when present.

    python -m benchmarks.bench_calibration [--prompts 4] [--seeds 1] [--steps 10] [--resolution 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.sdxl_like import lora_targets, random_kohya  # noqa: E402

PROMPTS = [
    "a photo of sks dog on a beach",
    "a portrait of sks dog wearing a hat",
    "sks dog sleeping on a red sofa",
    "sks dog running through snow",
    "a close-up of sks dog in a garden",
    "sks dog next to a bicycle",
    "sks dog in a city street at night",
    "sks dog on a wooden table",
]


def sd15_pipeline(dtype: torch.dtype, device: str):
    """StableDiffusionPipeline with SD1.5's UNet, CLIP ViT-L text encoder and VAE shapes, random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from lorasched.tiny import tiny_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, max_position_embeddings=77))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)


def save_configs(pipe, folder: Path) -> None:
    """Configs only (no weights): all `read_pair` needs to read the LoRAs onto a skeleton."""
    pipe.save_config(folder)
    pipe.unet.save_config(folder / "unet")
    pipe.vae.save_config(folder / "vae")
    pipe.scheduler.save_config(folder / "scheduler")
    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=512 if gpu else 256)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    from lorasched.calibration.aggregate import aggregate
    from lorasched.calibration.runner import Settings, calibrate
    from lorasched.merge.lora_io import read_pair
    from lorasched.merge.rules.feature_kl import FeatureKLRule

    device, dtype = ("cuda", torch.float16) if gpu else ("cpu", torch.float32)
    folder = Path(tempfile.mkdtemp(prefix="bench_calibration_"))
    pipe = sd15_pipeline(dtype, device)
    save_configs(pipe, folder / "sd15")
    targets = lora_targets(pipe.unet)
    paths = []
    for role, seed in (("subject", 1), ("style", 2)):
        paths.append(folder / f"{role}.safetensors")
        save_file(random_kohya(targets, args.rank, seed), paths[-1])
    pair = read_pair(str(folder / "sd15"), *map(str, paths))
    prompts = tuple(PROMPTS[: args.prompts])
    seeds = tuple(range(args.seeds))
    settings = Settings("feature-kl", prompts, seeds, args.steps, 7.5, args.resolution, args.resolution,
                        (pair.subject.sha256, pair.style.sha256))

    def synchronize():
        if gpu:
            torch.cuda.synchronize()

    pipe(prompts[0], num_inference_steps=1, height=args.resolution, width=args.resolution, output_type="latent")
    start = time.perf_counter()  # after a warm-up pass, so one-off initialisation is in neither row
    for seed in seeds:
        pipe(list(prompts), num_inference_steps=args.steps, height=args.resolution, width=args.resolution,
             generator=[torch.Generator().manual_seed(seed) for _ in prompts], output_type="latent")
    synchronize()
    plain = time.perf_counter() - start

    bar = tqdm(total=len(settings.runs()) * args.steps, desc="calibrating", unit="step")
    start = time.perf_counter()
    log = calibrate(pipe, pair, FeatureKLRule(), settings, folder / "log.jsonl", batch_size=len(prompts), bar=bar)
    synchronize()
    calibration = time.perf_counter() - start
    bar.close()
    schedule = aggregate(log, pair)
    shares = [share for values in schedule.agreement.values() for share in values]

    runs = len(settings.runs())
    print(f"\ndevice {device} ({dtype}), {args.resolution} px, {args.steps} steps, {len(prompts)} prompts × "
          f"{len(seeds)} seed(s), CFG 7.5, batch {len(prompts)}; {len(pair.decided)} both-adapted layers, "
          f"rank {args.rank}")
    print(f"{'run':<52}{'seconds':>9}{'ratio':>8}")
    print(f"{'plain pipeline, no LoRA (same passes)':<52}{plain:>9.1f}{1.0:>8.2f}")
    print(f"{'feature-kl calibration (balance run + runs, logged)':<52}{calibration:>9.1f}{calibration / plain:>8.2f}")
    print(f"per image and step: {calibration / (runs + 1) / args.steps:.2f} s; "
          f"mean agreement {sum(shares) / len(shares):.1%}")


if __name__ == "__main__":
    main()
