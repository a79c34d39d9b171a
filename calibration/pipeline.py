"""The real base pipeline, with weights, for calibration runs: on `cuda` in half precision when there is one."""

from __future__ import annotations

from pathlib import Path

import torch

from ..merge.base import resolve_base
from ..merge.errors import LoraschedError
from ..merge.quiet import collected_loading_messages


def run_dtype(device: str, pipeline_class: str) -> torch.dtype:
    """fp32 on CPU; on a GPU bf16 for FLUX/SD3 transformers (fp16 overflows there), fp16 for UNets."""
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if pipeline_class.startswith(("Flux", "StableDiffusion3")) else torch.float16


def load_pipeline(base: str, device: str, dtype: torch.dtype | None = None):
    """The pipeline with its weights (a local folder, or a hub id downloaded in full)."""
    from diffusers import DiffusionPipeline

    root = resolve_base(base) if Path(base).exists() else base
    try:
        with collected_loading_messages():
            config = DiffusionPipeline.load_config(root)
            dtype = dtype or run_dtype(device, config["_class_name"])
            pipe = DiffusionPipeline.from_pretrained(root, dtype=dtype)
    except LoraschedError:
        raise
    except Exception as exc:  # missing weights, no network: one line for the user
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise LoraschedError(f"{base}: cannot load the pipeline with its weights for calibration ({reason})") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def default_size(pipe) -> int:
    """The pipeline's own default resolution in pixels."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    sample = getattr(pipe, "default_sample_size", None) or denoiser.config.sample_size
    return int(sample) * int(pipe.vae_scale_factor)
