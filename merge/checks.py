"""Checks of the user's arguments, shared by every command: one place, one wording, one `LoraschedError` each."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .errors import LoraschedError


def check_paths(subject: str, style: str, output: str) -> None:
    out = Path(output)
    for given in (subject, style):
        if Path(given).exists() and out.exists() and os.path.samefile(given, out):
            raise LoraschedError(f"{output}: output path is one of the inputs")
        if Path(given).resolve() == out.resolve():
            raise LoraschedError(f"{output}: output path is one of the inputs")
    if not out.parent.resolve().is_dir():
        raise LoraschedError(f"{output}: folder {out.parent} does not exist")
    if out.suffix != ".safetensors":
        raise LoraschedError(f"{output}: output must be a .safetensors file")


def pick_device(device: str = "auto") -> str:
    """`cuda` when asked for or, with `auto`, when present; else `cpu`."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LoraschedError("--device cuda: no CUDA device is available")
    return device


def check_steps(steps: int) -> None:
    if steps < 1:
        raise LoraschedError(f"--steps {steps}: need at least one denoising step")


def check_size(size: int | None) -> None:
    """A requested image size the VAE can take (None: the pipeline's own)."""
    if size is not None and (size < 8 or size % 8):
        raise LoraschedError(f"--resolution {size}: must be a positive multiple of 8")


def parse_seeds(text: str) -> tuple[int, ...]:
    """`0,1,2,3` -> (0, 1, 2, 3)."""
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise LoraschedError(f"--seeds {text!r}: give integers separated by commas, e.g. 0,1,2,3") from None
    if not seeds or min(seeds) < 0:
        raise LoraschedError(f"--seeds {text!r}: give one or more non-negative integers, e.g. 0,1,2,3")
    return seeds


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """`0.25,0.5,1` -> (0.25, 0.5, 1.0); None or empty: None (the default)."""
    if not text or not text.strip():
        return None
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise LoraschedError(f"{option} {text!r}: give numbers separated by commas, e.g. 0.5,1,2") from None
    if not all(math.isfinite(value) for value in values):
        raise LoraschedError(f"{option} {text!r}: every value must be a finite number")
    return values


def check_report_dir(report_dir: str | None) -> None:
    """A report folder whose parent exists (the folder itself is made when the report is written)."""
    if report_dir is not None and not Path(report_dir).parent.resolve().is_dir():
        raise LoraschedError(f"{report_dir}: folder {Path(report_dir).parent} does not exist")
