"""The built-in tiny world: a random-weight SD pipeline and a random subject/style LoRA pair, made offline.

Used by `make demo` (python -m demo prepare DIR; python -m demo replay BASE FILE) and by the tests.
"""

from __future__ import annotations

import json
import os
import string
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPT = "a photo of sks dog in watercolor style"
CALIBRATION_PROMPTS = (
    "a photo of sks dog in watercolor style",
    "sks dog on a beach, watercolor",
    "a watercolor painting of sks dog sleeping",
    "sks dog in a garden, watercolor style",
)


def _tokenizer():
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
        tokenizer=_tokenizer(),
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
    """A kohya-format LoRA over UNet linears whose names end with `targets` (and the CLIP attention projections if asked),
    each module with its own random magnitude so that selection rules have something to choose between.
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


def prepare(workdir: Path) -> None:
    """Write the tiny base pipeline and a subject (rank 4, alpha 2) / style (rank 8, alpha 3) kohya pair."""
    workdir.mkdir(parents=True, exist_ok=True)
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(workdir / "tiny-sd")
    save_file(random_kohya_lora(pipe, rank=4, alpha=2.0, seed=1), workdir / "subject.safetensors")
    save_file(random_kohya_lora(pipe, rank=8, alpha=3.0, seed=2), workdir / "style.safetensors")
    (workdir / "prompts.txt").write_text("\n".join(CALIBRATION_PROMPTS) + "\n")
    print(f"prepared {workdir}/tiny-sd (random SD pipeline), subject/style LoRAs (kohya, ranks 4 and 8) and "
          f"{len(CALIBRATION_PROMPTS)} calibration prompts")


def replay(base: str, path: str) -> None:
    """Replay the file and check it against the online rule it was made from, at two step counts."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from calibration.online import OnlineRule
    from merge import fileformat, rules
    from merge.convert import read_pair
    from merge.replay import attach

    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    scheduled = fileformat.read(path)
    folder = Path(path).parent
    pair = read_pair(base, *(str(folder / scheduled.sources[s]["file"]) for s in ("subject", "style")))
    options = rules.RuleOptions(**{k: scheduled.params[k] for k in ("alpha", "beta")}, pattern=scheduled.params["pattern"])
    rule, _ = rules.build(scheduled.method, pair, options)
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)

    def generate(steps: int):
        start = time.perf_counter()
        latents = pipe(PROMPT, num_inference_steps=steps, height=32, width=32, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
        return latents, time.perf_counter() - start

    with OnlineRule(pipe, pair, rule):
        online = {steps: generate(steps) for steps in (20, 7)}
    handle = attach(pipe, path)
    print(f"attached {path}: {len(handle.tracks)} switching layers, {len(handle.change_points)} switch points")
    for steps, (reference, online_time) in online.items():
        latents, replay_time = generate(steps)
        gap = (latents - reference).abs().max().item() / reference.abs().max().item()
        print(f"{steps:>2} steps: replay {replay_time:.2f}s, online {scheduled.method} {online_time:.2f}s,"
              f" max |replay - online| / max |latent| = {gap:.1e} (float32)")
    handle.detach()
    print(f"detached: pipeline restored (adapters left: {pipe.get_list_adapters() or 'none'})")


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "prepare":
        prepare(Path(argv[1]))
    elif len(argv) == 3 and argv[0] == "replay":
        replay(argv[1], argv[2])
    else:
        sys.exit("usage: python -m demo prepare DIR | python -m demo replay BASE FILE")


if __name__ == "__main__":
    main(sys.argv[1:])
