"""The one-shot job: two LoRA files and a base -> one scheduled LoRA file. The CLI is a thin shell around it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import export, rules
from .base import load_skeleton
from .errors import LoraschedError
from .lora import STYLE, SUBJECT, LoraPair, denoiser_name
from .lora_io import open_lora, read_lora
from .schedule import Schedule, from_rule


@dataclass(frozen=True)
class MergeResult:
    output: Path
    schedule: Schedule
    params: dict
    both_adapted: int


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


def read_pair(base: str, subject: str, style: str) -> LoraPair:
    """Both LoRAs checked, then read onto one skeleton of the base in their own (promoted) dtype; see base.py."""
    raw_subject, raw_style = open_lora(subject), open_lora(style)
    skeleton = load_skeleton(base, torch.promote_types(raw_subject.dtype, raw_style.dtype))
    pair = LoraPair(
        subject=read_lora(raw_subject, skeleton, SUBJECT),
        style=read_lora(raw_style, skeleton, STYLE),
        denoiser=denoiser_name(skeleton),
        pipeline_class=type(skeleton).__name__,
        single_text_encoder=getattr(skeleton, "text_encoder_2", None) is None,
    )
    if not pair.both_adapted:
        raise LoraschedError(f"{style}: adapts no denoiser module that {subject} adapts; nothing to schedule")
    return pair


def pick_device(device: str = "auto") -> str:
    """`cuda` when asked for or, with `auto`, when present; else `cpu`."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LoraschedError("--device cuda: no CUDA device is available")
    return device


def merge(
    base: str,
    subject: str,
    style: str,
    output: str,
    method: str = "klora",
    options: rules.RuleOptions = rules.RuleOptions(),
    *,
    steps: int = 30,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    progress=iter,
) -> MergeResult:
    """Read, score, schedule and export; `steps` is the reference step count shown by `inspect`."""
    if steps < 1:
        raise LoraschedError(f"--steps {steps}: need at least one denoising step")
    rules.validate(method, options)
    check_paths(subject, style, output)
    pair = read_pair(base, subject, style)
    rule, params = rules.build(method, pair, options, pick_device(device), progress)
    params["steps"] = steps
    schedule = from_rule(rule, pair)
    export.export(
        output,
        pair,
        schedule,
        method=method,
        params=params,
        scores=getattr(rule, "scores", {}),
        dtype=dtype,
    )
    return MergeResult(Path(output), schedule, params, len(pair.both_adapted))
