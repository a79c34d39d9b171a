"""Reading LoRA files of any format diffusers understands onto a base, through diffusers' own loader.

The file's tensors are handed to the base pipeline class's `load_lora_weights` on a skeleton of the base
(see `base.py`); diffusers converts the key format (kohya with diffusers or SGM names, old attn-procs, PEFT, …),
PEFT checks every module exists with matching shapes, and we read back, per adapted layer, exactly the factors
and scaling a real load would use. No key surgery lives here, only the checks that give clear errors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import LoraschedError
from .lora import LoraFile, LoraModule
from .quiet import collected_loading_messages, key_problems

UNSUPPORTED_MARKERS = {
    "hada_": "LyCORIS LoHa",
    "lokr_": "LyCORIS LoKr",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
}
LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "_lora.down", "_lora.up", ".lora.down", ".lora.up")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and `__metadata__` of a safetensors file, with one-line errors for what is not one."""
    path = Path(path)
    if not path.is_file():
        raise LoraschedError(f"{path}: no such file")
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise LoraschedError(f"{path}: pickle files are not read (they can run code); convert it to .safetensors")
    try:
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoraschedError(f"{path}: not a readable safetensors file ({reason})") from exc
    return tensors, metadata


def check_lora_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse what is not a plain LoRA before diffusers sees it: empty, unsupported families, non-finite values."""
    if not tensors:
        raise LoraschedError(f"{path}: holds no tensors")
    for marker, family in UNSUPPORTED_MARKERS.items():
        if any(marker in key for key in tensors):
            raise LoraschedError(f"{path}: {family} weights are not supported (plain LoRA only)")
    if not any(marker in key for key in tensors for marker in LORA_MARKERS):
        raise LoraschedError(f"{path}: holds no LoRA factors (is it a full checkpoint rather than a LoRA?)")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LoraschedError(f"{path}: tensor {key} holds NaN or infinite values")


def fold_kohya_alphas(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold each kohya `.alpha` into its `lora_down` (down · alpha / r, in place) and drop the alpha keys.

    The file means ΔW = alpha / r · up · down per module. diffusers 0.42 maps the alphas of SD/SDXL kohya files
    onto PEFT's `alpha_pattern` under names that match no module, so every module silently gets the most common
    alpha; without alpha keys it uses scale 1 per module, which after the fold is exact.
    """
    folded = dict(tensors)
    for key in [k for k in tensors if k.endswith(".alpha")]:
        down_key = key.removesuffix(".alpha") + ".lora_down.weight"
        if down_key in tensors:
            down = tensors[down_key]
            down.mul_(float(tensors[key]) / down.shape[0])
            del folded[key]
    return folded


def lora_components(pipe) -> list[str]:
    """Pipeline components a LoRA can adapt, in diffusers' own order (denoiser, then text encoders)."""
    return [name for name in pipe._lora_loadable_modules if getattr(pipe, name, None) is not None]


def _adapted_layers(pipe, adapter: str):
    for component in lora_components(pipe):
        for name, module in getattr(pipe, component).named_modules():
            lora_a = getattr(module, "lora_A", None)
            if lora_a is not None and adapter in lora_a:
                yield f"{component}.{name}", module


def _read_back(path: Path, pipe, adapter: str) -> dict[str, LoraModule]:
    modules = {}
    for name, layer in _adapted_layers(pipe, adapter):
        if layer.use_dora.get(adapter):
            raise LoraschedError(f"{path}: DoRA weights are not supported (plain LoRA only)")
        if getattr(layer.lora_B[adapter], "bias", None) is not None:
            raise LoraschedError(f"{path}: LoRA bias terms are not supported")
        modules[name] = LoraModule(
            down=layer.lora_A[adapter].weight.detach(),
            up=layer.lora_B[adapter].weight.detach(),
            scale=float(layer.scaling[adapter]),
        )
    return modules


def _reason(exc: Exception) -> str:
    """The most telling line of a loader's error (a size mismatch names the module and both shapes)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    telling = [line for line in lines if "size mismatch" in line or "not found" in line]
    return (telling or lines)[0][:300]


@dataclass
class RawLora:
    """A LoRA file's tensors as stored, checked but not yet mapped onto a base."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def dtype(self) -> torch.dtype:
        return next(t.dtype for t in self.tensors.values() if t.is_floating_point())


def open_lora(path: str | Path) -> RawLora:
    """Read and check a LoRA file: every problem found here is a one-line `LoraschedError`."""
    tensors, metadata = read_tensors(path)
    check_lora_tensors(path, tensors)
    return RawLora(Path(path), tensors, metadata)


def read_lora(raw: RawLora, skeleton, adapter: str) -> LoraFile:
    """Map `raw` onto the skeleton pipeline as `adapter`; every module must exist in the base with its shape."""
    path, dtype = raw.path, raw.dtype
    with collected_loading_messages() as messages:
        try:
            skeleton.load_lora_weights(fold_kohya_alphas(raw.tensors), adapter_name=adapter, low_cpu_mem_usage=True)
        except Exception as exc:  # diffusers/PEFT raise many types for a LoRA that does not fit
            raise LoraschedError(f"{path}: does not fit this base model ({_reason(exc)})") from exc
    unexpected = key_problems(messages)
    if unexpected:
        raise LoraschedError(f"{path}: keys that match no module of this base ({unexpected[0][:240]})")
    modules = _read_back(path, skeleton, adapter)
    if not modules:
        raise LoraschedError(f"{path}: no module of this base is adapted by it")
    return LoraFile(path=str(path), sha256=file_sha256(path), dtype=dtype, modules=modules, metadata=raw.metadata)
