"""What `lorasched eval` and `--balance auto` cost on a pipeline the size of SD1.5 (random weights: full-size UNet,
CLIP text encoder and VAE) with a random rank-16 kohya pair, scored by random embedders of the default models'
sizes (CLIP ViT-B/32, DINO ViT-S/16). Rows: a plain generation without LoRA (the reference), `eval` of a K-LoRA
and a direct file (generation through `attach` + scoring, per image), the `--balance auto` search over K-LoRA's
default 3 × 3 grid (probe generations run online + scoring, in all), and the same search resumed from its
complete log. Uses `cuda` (fp16) when present.

    python -m benchmarks.bench_eval [--prompts 1] [--seeds 1] [--steps 4] [--resolution 128]   (CPU defaults;
                                                                            GPU: 2 prompts, 20 steps, 512 px)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from benchmarks.bench_calibration import PROMPTS, save_configs, sd15_pipeline  # noqa: E402
from benchmarks.sdxl_like import lora_targets, random_kohya  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def save_embedders(folder: Path) -> tuple[Path, Path]:
    """Random CLIP ViT-B/32 (transformers' CLIPConfig defaults are its shapes) and DINO ViT-S/16, as folders."""
    from lorasched.tiny import tiny_tokenizer
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    torch.manual_seed(0)
    clip, dino = folder / "clip-vit-b32", folder / "dino-vits16"
    CLIPModel(CLIPConfig()).save_pretrained(clip)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tiny_tokenizer()).save_pretrained(clip)
    ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       image_size=224, patch_size=16)).save_pretrained(dino)
    ViTImageProcessor(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(dino)
    return clip, dino


def save_references(folder: Path, size: int) -> tuple[Path, Path]:
    """One seeded-noise subject and one style image: what they show does not change the cost."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    sides = []
    for side in ("subject", "style"):
        (folder / side).mkdir(parents=True)
        pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / side / "reference.png")
        sides.append(folder / side)
    return sides[0], sides[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--prompts", type=int, default=2 if gpu else 1)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20 if gpu else 4)
    parser.add_argument("--resolution", type=int, default=512 if gpu else 128)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    from lorasched.evaluation.balance import SearchSettings, grid, search, switch_knob
    from lorasched.evaluation.evaluate import evaluate, render
    from lorasched.evaluation.metrics import load_judge
    from lorasched.convert import merge
    from lorasched.merge import rules
    from lorasched.merge.lora_io import read_pair

    device, dtype = ("cuda", torch.float16) if gpu else ("cpu", torch.float32)
    folder = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    pipe = sd15_pipeline(dtype, device)
    save_configs(pipe, folder / "sd15")
    targets = lora_targets(pipe.unet)
    loras = []
    for role, seed in (("subject", 1), ("style", 2)):
        loras.append(str(folder / f"{role}.safetensors"))
        save_file(random_kohya(targets, args.rank, seed), loras[-1])
    files = []
    for method in ("klora", "direct"):
        files.append(str(folder / f"{method}.safetensors"))
        merge(str(folder / "sd15"), *loras, files[-1], method, steps=args.steps)
    pair = read_pair(str(folder / "sd15"), *loras)
    clip, dino = save_embedders(folder)
    subject_refs, style_refs = save_references(folder / "refs", args.resolution)
    judge = load_judge(str(clip), str(dino), str(subject_refs), str(style_refs), device)
    prompts, seeds = list(PROMPTS[: args.prompts]), list(range(args.seeds))
    runs = len(prompts) * len(seeds)

    render(pipe, prompts[0], 0, 1, 7.5, args.resolution)  # warm-up, in no row
    plain = [render(pipe, prompt, seed, args.steps, 7.5, args.resolution)[1] for prompt in prompts for seed in seeds]
    start = time.perf_counter()
    result = evaluate(pipe, files, judge, prompts, seeds, args.steps, 7.5, args.resolution)
    eval_total = time.perf_counter() - start

    rule, params = rules.build("klora", pair, rules.RuleOptions())
    settings = SearchSettings(
        method="klora", candidates=grid(rule.ramp.beta), prompts=tuple(prompts), seeds=tuple(seeds), steps=args.steps,
        guidance=7.5, size=args.resolution, pair=(pair.subject.sha256, pair.style.sha256),
        references=(judge.subject.sha256, judge.style.sha256), clip=str(clip), dino=str(dino),
    )
    log = folder / "balance.jsonl"
    timings = []
    for _ in range(2):  # the search, then the same search resumed from its complete log
        start = time.perf_counter()
        searched = search(pipe, pair, settings, judge, log, switch_knob(rule, params))
        timings.append(time.perf_counter() - start)
    candidates = len(settings.candidates)

    plain_image = sum(plain) / len(plain)
    print(f"\ndevice {device} ({dtype}), {args.resolution} px, {args.steps} steps, CFG 7.5, {len(prompts)} prompt(s) × "
          f"{len(seeds)} seed(s); SD1.5-size random pipeline, rank-{args.rank} pair over {len(pair.decided)} "
          f"both-adapted layers; random CLIP ViT-B/32 + DINO ViT-S/16 embedders")
    print(f"{'job':<58}{'images':>7}{'seconds':>9}{'s/image':>9}{'ratio':>7}")

    def row(name: str, images: int, seconds: float, per_image: float) -> None:
        print(f"{name:<58}{images:>7}{seconds:>9.1f}{per_image:>9.2f}{per_image / plain_image:>7.2f}")

    row("plain pipeline, no LoRA (generation)", runs, sum(plain), plain_image)
    for scored in result.files:
        row(f"eval {Path(scored.file).name}: generation through attach", runs, scored.seconds_per_image * runs,
            scored.seconds_per_image)
    images = len(files) * runs
    row("eval, both files: generation + scoring, in all", images, eval_total, eval_total / images)
    row(f"--balance auto: {candidates} candidates × {runs} probe(s), in all", candidates * runs, timings[0],
        timings[0] / (candidates * runs))
    print(f"{'--balance auto resumed from its complete log':<58}{searched.generated:>7}{timings[1]:>9.1f}")
    print(f"chosen {searched.chosen.label()}; eval harmonic CLIP: "
          + ", ".join(f"{Path(f.file).name} {f.scores.harmonic_clip:.3f}" for f in result.files))


if __name__ == "__main__":
    main()
