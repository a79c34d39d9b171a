"""What a LoRA file from the internet is, read from its keys, shapes and metadata alone (no base model needed).

`lorasched inspect` prints this for any file that is not a lorasched file: the first thing a user runs on a
download. It classifies the key layout (which trainer wrote it), guesses the base architecture, and lists modules,
ranks, alphas, dtypes, text-encoder parts and metadata keys. It maps no key onto a model: merging does that
through diffusers' converters (lora_io.py); here a whole file is only sorted into the family its keys belong to.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import LoraschedError
from .lora_io import ADAPTER_METADATA, PEFT_WRAPPER_PREFIX, describe_riders, lora_factors, read_tensors, riders

# Per-module factor suffixes of each layout, longest first: the rest of a key is the module's stem.
# XLabs' `qkv_lora1`/`qkv_lora2` (image/text stream) are two modules: only the generic `.down.weight` is cut off them.
FACTOR_SUFFIXES = (
    "_lora_down.weight", "_lora_up.weight", ".lora_down.weight", ".lora_up.weight", ".lora_A.weight",
    ".lora_B.weight", ".lora.down.weight", ".lora.up.weight", "_lora.down.weight", "_lora.up.weight",
    ".down.weight", ".up.weight", ".alpha", ":down", ":up",
)
DOWN_SUFFIXES = tuple(s for s in FACTOR_SUFFIXES if "down" in s or "lora_A" in s)
LYCORIS = re.compile(r"\.(hada_|lokr_|dora_scale)")
TEXT_ENCODER_PARTS = (("lora_te2_", "text encoder 2"), ("text_encoder_2.", "text encoder 2"),
                      ("lora_te1_", "text encoder"), ("lora_te_", "text encoder"), ("text_encoder.", "text encoder"),
                      ("text_encoder:", "text encoder"))
# (ss_base_model_version or modelspec.architecture prefix, architecture) — what trainers write when they know
DECLARED = (("sdxl", "SDXL"), ("stable-diffusion-xl", "SDXL"), ("flux", "FLUX.1"), ("sd3", "SD3"),
            ("stable-diffusion-v3", "SD3"), ("sd_v2", "SD2.x"), ("stable-diffusion-v2", "SD2.x"),
            ("sd_v1", "SD1.x"), ("stable-diffusion-v1", "SD1.x"))
CROSS_ATTENTION_WIDTHS = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
# FLUX.1 and SD3 double-stream blocks share every diffusers module name; their hidden width tells them apart.
MMDIT_WIDTHS = {3072: "FLUX.1", 1536: "SD3 (MMDiT)", 2432: "SD3 (MMDiT)"}
MMDIT_ATTENTION = re.compile(r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)\.")


@dataclass(frozen=True)
class Anatomy:
    path: str
    layout: str
    architecture: str
    modules: int
    ranks: Counter
    alphas: str
    dtypes: Counter
    text_encoder_parts: dict[str, int]
    metadata: dict[str, str] = field(default_factory=dict)
    refusal: str | None = None  # why merging would refuse it, or None


def stem(key: str) -> str:
    for suffix in FACTOR_SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix)
    match = LYCORIS.search(key)
    return key[: match.start()] if match else key


def layout(keys: list[str]) -> str:
    """The trainer family the key names belong to (diffusers' converters decide the mapping at merge time)."""
    text = " ".join(keys[:4000])
    if ".hada_" in text:
        return "LyCORIS LoHa (read as LoRA factors, exactly)"
    if ".lokr_" in text:
        return "LyCORIS LoKr (read as LoRA factors, exactly)"
    if all(k.count(":") == 2 for k in keys):
        return "cloneofsimo lora_diffusion (indexed keys)"
    if "_lora_down.weight" in text:
        return "malformed kohya-like names"
    if "processor.qkv_lora" in text or "processor.proj_lora" in text:
        return "XLabs FLUX"
    if "lora_down" in text:
        if "lora_unet_double_blocks_" in text or "lora_unet_single_blocks_" in text:
            return "kohya, BFL FLUX names (fused qkv)"
        if "lora_transformer_" in text:
            return "kohya-style, diffusers FLUX names (OneTrainer)"
        if re.search(r"lora_unet_(input|output)_blocks_|lora_unet_middle_block_", text):
            return "kohya, SGM/LDM names"
        if "lora_unet_" in text or "lora_te" in text:
            return "kohya, diffusers names"
        return "diffusers-prefixed lora_down/lora_up"
    if "_lora.down." in text:
        return "diffusers attention processors (old)"
    if ".lora.down." in text:
        return "diffusers LoRA layers (non-PEFT)"
    if "lora_A" in text:
        if all(k.startswith(PEFT_WRAPPER_PREFIX + ".") for k in keys):
            return "raw PEFT adapter (base_model.model.…)"
        if any(k.startswith(("unet.", "transformer.", "text_encoder")) for k in keys):
            return "diffusers/PEFT (ai-toolkit, SimpleTuner)"
        return "diffusers/PEFT, denoiser-relative (no component prefix)"
    return "unknown"


def architecture(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Declared by the metadata when it says, else read from the key names and the cross-attention width."""
    declared = (metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture") or "").lower()
    for prefix, name in DECLARED:
        if declared.startswith(prefix):
            return f"{name} (declared)"
    if "ss_v2" in metadata:  # kohya sd-scripts before ss_base_model_version
        return f"{'SD2.x' if metadata['ss_v2'] == 'True' else 'SD1.x'} (declared by ss_v2)"
    keys = list(tensors)
    if any(re.search(r"double_blocks|single_blocks|single_transformer_blocks", k) for k in keys):
        return "FLUX.1"
    if any("joint_blocks" in k for k in keys):
        return "SD3 (MMDiT)"
    if any(k.startswith("transformer.transformer_blocks") for k in keys):
        return _mmdit(tensors)
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys):
        return "SDXL"
    for key, tensor in tensors.items():
        if re.search(r"attn2.*to_k", key) and key.endswith(DOWN_SUFFIXES) and tensor.dim() >= 2:
            width = tensor.shape[1]
            return CROSS_ATTENTION_WIDTHS.get(width, f"unknown UNet (cross-attention width {width})")
    return "unknown"


def _mmdit(tensors: dict[str, torch.Tensor]) -> str:
    """FLUX.1 or SD3 for a diffusers-named transformer LoRA without FLUX's single-stream blocks, by hidden width."""
    widths = {t.shape[1] for k, t in tensors.items() if MMDIT_ATTENTION.search(k) and k.endswith(DOWN_SUFFIXES)}
    if len(widths) == 1 and min(widths) in MMDIT_WIDTHS:
        return MMDIT_WIDTHS[min(widths)]
    shown = f"width {', '.join(map(str, sorted(widths)))}" if widths else "no attention factors"
    return f"FLUX.1 or SD3 (double-stream blocks only, {shown})"


def _alphas(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    values = Counter(float(t) for k, t in tensors.items() if k.endswith(".alpha") and t.numel() == 1)
    if values:
        return ", ".join(f"{v:g}×{n}" for v, n in sorted(values.items())) + " (kohya .alpha keys)"
    if ADAPTER_METADATA in metadata:
        config = json.loads(metadata[ADAPTER_METADATA])
        pattern = config.get("alpha_pattern") or {}
        return f"{config.get('lora_alpha')} (diffusers {ADAPTER_METADATA})" + (f", {len(pattern)} overrides" if pattern else "")
    return "none (alpha = rank, scale 1)"


def inspect_lora(path: str | Path, allow_pickle: bool = False) -> Anatomy:
    """Read a LoRA file of any layout and describe it; only unreadable files raise."""
    tensors, metadata = read_tensors(path, allow_pickle)
    if not tensors:
        raise LoraschedError(f"{path}: holds no tensors")
    factors = tensors  # LoKr/LoHa: the LoRA factors lorasched converts them to (their ranks are those)
    try:
        factors, _ = lora_factors(path, tensors)
        refusal = None
    except LoraschedError as exc:
        refusal = str(exc).removeprefix(f"{path}: ")
    extra = riders(tensors)
    stems = {stem(k) for k in tensors if k not in extra}
    ranks = Counter(t.shape[0] for k, t in factors.items() if k.endswith(DOWN_SUFFIXES) and t.dim() >= 2)
    parts = Counter(next((part for prefix, part in TEXT_ENCODER_PARTS if s.startswith(prefix)), None) for s in stems)
    parts.pop(None, None)
    return Anatomy(
        path=str(path),
        layout=layout(sorted(set(tensors) - set(extra))) + (f", plus {describe_riders(extra)}" if extra else ""),
        architecture=architecture(tensors, metadata),
        modules=len(stems),
        ranks=ranks,
        alphas=_alphas(tensors, metadata),
        dtypes=Counter(str(t.dtype).removeprefix("torch.") for k, t in tensors.items()
                       if not k.endswith(".alpha") and k not in extra),
        text_encoder_parts=dict(parts),
        metadata=metadata,
        refusal=refusal,
    )


def describe(anatomy: Anatomy) -> list[str]:
    """The lines `lorasched inspect` prints for a LoRA that is not a lorasched file."""
    def counts(counter: Counter) -> str:
        return ", ".join(f"{value}×{n}" for value, n in sorted(counter.items(), key=lambda item: str(item[0]))) or "—"

    size_mb = Path(anatomy.path).stat().st_size / 2**20
    parts = ", ".join(f"{part}: {n} modules" for part, n in sorted(anatomy.text_encoder_parts.items())) or "none"
    keys = sorted(anatomy.metadata)
    shown = ", ".join(keys[:12]) + (f", … {len(keys) - 12} more" if len(keys) > 12 else "") if keys else "none"
    return [
        f"file          {anatomy.path} ({size_mb:.2f} MiB, not a lorasched file)",
        f"format        {anatomy.layout}",
        f"architecture  {anatomy.architecture}",
        f"modules       {anatomy.modules}",
        f"ranks         {counts(anatomy.ranks)}",
        f"alphas        {anatomy.alphas}",
        f"dtype         {counts(anatomy.dtypes)}",
        f"text encoder  {parts}",
        f"metadata      {shown}",
        f"merge         {'refused: ' + anatomy.refusal if anatomy.refusal else 'readable (fit is checked against the base at merge time)'}",
    ]
