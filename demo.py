"""`make demo`: the tiny world on disk, then a replay-vs-online check of the merged file.

`python -m lorasched.demo prepare DIR` writes a random tiny SD pipeline, a subject/style LoRA pair and prompts;
`python -m lorasched.demo replay BASE FILE` replays a merged file against the online rule it was made from.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .tiny import random_kohya_lora, tiny_sd_pipeline

PROMPT = "a photo of sks dog in watercolor style"
CALIBRATION_PROMPTS = (
    "a photo of sks dog in watercolor style",
    "sks dog on a beach, watercolor",
    "a watercolor painting of sks dog sleeping",
    "sks dog in a garden, watercolor style",
)


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
    from transformers.utils import logging as transformers_logging

    from .calibration.online import OnlineRule
    from .merge import fileformat, rules
    from .merge.lora_io import read_pair
    from .merge.replay import attach

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    scheduled = fileformat.read(path)
    folder = Path(path).parent
    pair = read_pair(base, *(str(folder / source.file) for source in scheduled.sources))
    rule = rules.from_file(scheduled)  # the rule the file was made with, from its params and recorded scores
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
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if len(argv) == 2 and argv[0] == "prepare":
        prepare(Path(argv[1]))
    elif len(argv) == 3 and argv[0] == "replay":
        replay(argv[1], argv[2])
    else:
        sys.exit("usage: python -m lorasched.demo prepare DIR | python -m lorasched.demo replay BASE FILE")


if __name__ == "__main__":
    main(sys.argv[1:])
