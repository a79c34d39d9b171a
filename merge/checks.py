"""Checks of the user's arguments, shared by every command: one place, one wording, one `LoraschedError` each."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LoraschedError
from .lora import ROLES, STATIC, STYLE, SUBJECT


@dataclass(frozen=True)
class LoraSpec:
    """One input LoRA as the user names it: its path, its role, and the strength that multiplies its delta."""

    path: str
    role: str
    strength: float = 1.0


def parse_lora(text: str, role: str | None = None, option: str = "--lora") -> LoraSpec:
    """`[ROLE=]PATH[:STRENGTH]`: `--subject`/`--style` give the role, `--lora` takes it from a `ROLE=` prefix
    (default `static`). A `:STRENGTH` suffix is read only when it is a number, so `C:/loras/a.safetensors` stays a
    path."""
    given = text
    prefix, sep, rest = text.partition("=")
    if sep and prefix.isalpha() and prefix not in ROLES and not Path(text).exists():
        raise LoraschedError(f"{option} {given}: unknown role {prefix!r} (choose from {', '.join(ROLES)})")
    if sep and prefix in ROLES:
        if role is not None:
            raise LoraschedError(f"{option} {given}: the role is given twice (by the option and by {prefix}=)")
        role, text = prefix, rest
        if rest.partition("=")[0] in ROLES:
            raise LoraschedError(f"{option} {given}: the role is given twice")
    strength = 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            strength = float(tail)
        except ValueError:
            pass
        else:
            text = head
            if not math.isfinite(strength) or strength == 0:
                raise LoraschedError(f"{option} {given}: strength {tail} must be a finite, non-zero number")
    return LoraSpec(text, role or STATIC, strength)


def check_sources(specs: list[LoraSpec], output: str) -> None:
    """At least one subject and one style, each file given once, none of them the output."""
    if len(specs) < 2:
        raise LoraschedError("give at least two LoRAs: one --subject and one --style")
    for role, option in ((SUBJECT, "--subject"), (STYLE, "--style")):
        if not any(spec.role == role for spec in specs):
            raise LoraschedError(f"no {role} LoRA: give {option} (or --lora {role}=PATH)")
    seen: dict[str, str] = {}
    for spec in specs:
        key = os.path.realpath(spec.path)
        if key in seen:
            raise LoraschedError(f"{spec.path}: given twice (as {seen[key]} and as {spec.role}); give each file once")
        seen[key] = spec.role
    check_paths([spec.path for spec in specs], output)


def check_paths(inputs: list[str], output: str) -> None:
    out = Path(output)
    for given in inputs:
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
