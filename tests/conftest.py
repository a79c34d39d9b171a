"""Tiny pipelines and LoRAs built in code (seeded, no downloads), shared by the tests of a session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lorasched.demo import random_kohya_lora, tiny_sd_pipeline
from safetensors.torch import save_file

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures" / "loras"
# Tests of the real files in ../shared skip in a plain clone without it; CI sets LORASCHED_REQUIRE_SHARED=1 so that
# there they run (and fail, never skip, if ../shared went missing).
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir() and not os.environ.get("LORASCHED_REQUIRE_SHARED"),
    reason=f"{SHARED} is absent (a plain clone): the real fixture files are not here",
)

# Tiny models gain nothing from intra-op threads, and on a shared 2-core host oversubscribed threads make a
# tiny SDXL step ~60x slower (measured: 2.5 s vs 0.04 s per UNet call).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A saved tiny SD pipeline folder, usable as `--base`."""
    folder = tmp_path_factory.mktemp("base") / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def kohya_pair(tiny_base, tmp_path_factory) -> tuple[Path, Path]:
    """Subject rank 4 / alpha 2 and style rank 8 / alpha 3, kohya format, both with CLIP attention parts.

    The module sets overlap partly: to_out.0 only in the subject, ff.net.2 only in the style.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    folder = tmp_path_factory.mktemp("loras")
    subject, style = folder / "subject.safetensors", folder / "style.safetensors"
    save_file(random_kohya_lora(pipe, 4, 2.0, seed=1, text_encoder=True), subject)
    style_targets = ("to_q", "to_k", "to_v", "ff.net.2")
    save_file(random_kohya_lora(pipe, 8, 3.0, seed=2, targets=style_targets, text_encoder=True), style)
    return subject, style


@pytest.fixture
def pipe64(tiny_base):
    """A fresh float64 pipeline, so replay-vs-online differences show logic, not float32 rounding."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(*args):
    """`lorasched ARGS…` through click's runner; paths and numbers may be given as they are."""
    from click.testing import CliRunner
    from lorasched.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def pipe(tiny_base):
    """The tiny SD pipeline with its weights, as the calibrating commands load it (float32, CPU)."""
    from lorasched.calibration.pipeline import load_pipeline

    return load_pipeline(str(tiny_base), "cpu")


@pytest.fixture(scope="module")
def pair(tiny_base, kohya_pair):
    """`kohya_pair` read onto the tiny base."""
    from lorasched.merge.lora_io import read_pair

    return read_pair(str(tiny_base), *map(str, kohya_pair))


def generate(pipe, steps: int, seed: int = 0) -> torch.Tensor:
    return pipe(
        "a photo of sks dog",
        num_inference_steps=steps,
        height=32,
        width=32,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
    ).images


@pytest.fixture(scope="session")
def tiny_embedders(tmp_path_factory) -> tuple[Path, Path]:
    """Folders of a random tiny CLIP and a random tiny ViT (DINO's architecture), usable as --clip / --dino."""
    from lorasched.tiny import save_tiny_clip, save_tiny_vit

    folder = tmp_path_factory.mktemp("embedders")
    return save_tiny_clip(folder / "clip"), save_tiny_vit(folder / "dino")
