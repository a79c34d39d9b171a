"""Reading LoRA files of any format diffusers understands onto a base, through diffusers' own loader.

The file's tensors are handed to the base pipeline class's `load_lora_weights` on a skeleton of the base
(see `base.py`); diffusers converts the key format (kohya with diffusers or SGM names, old attn-procs, PEFT, …),
PEFT checks every module exists with matching shapes, and we read back, per adapted layer, exactly the factors
and scaling a real load would use. No key surgery lives here, only the checks that give clear errors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .base import load_skeleton
from .errors import LoraschedError
from .lora import STYLE, SUBJECT, LoraFile, LoraModule, LoraPair, denoiser_name
from .names import SgmLayout, canonical_name
from .quiet import collected_loading_messages, key_problems

UNSUPPORTED_MARKERS = {
    "hada_": "LyCORIS LoHa",
    "lokr_": "LyCORIS LoKr",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
}
LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "_lora.down", "_lora.up", ".lora.down", ".lora.up",
                "_lora1.down", "_lora2.down")  # the last two: XLabs FLUX (`processor.qkv_lora1.down.weight`)
# Tensors that ride along in some LoRA files without being LoRA factors: textual-inversion embeddings saved by
# pivotal tuning (cloneofsimo `<s1>`, kohya `bundle_emb.<token>.…`). Layouts are recognised without them.
RIDER = re.compile(r"^<[^>]+>$|^bundle_emb\.")
FOREIGN_LAYOUTS = (  # (test on the LoRA keys, what to tell the user): formats no loader maps onto module names
    (lambda keys: all(k.count(":") == 2 and k.endswith((":up", ":down")) for k in keys),
     "cloneofsimo lora_diffusion format (`<part>:<index>:up/down` keys index a module list, no module names); "
     "convert it with lora_diffusion's own tools first"),
    (lambda keys: any(k.endswith(("_lora_down.weight", "_lora_up.weight")) for k in keys),
     "malformed kohya-like keys (`…_lora_down.weight` instead of `….lora_down.weight`"
     "{doubled}): no loader reads them; re-export the LoRA from its trainer"),
)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict through `torch.load(weights_only=True)` (no code runs); anything but a dict of tensors
    named by key is refused."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that needs code to load, or not a pickle at all
        raise LoraschedError(f"{path}: not a plain pickled state dict ({type(exc).__name__})") from exc
    if isinstance(loaded, (list, tuple)):
        raise LoraschedError(f"{path}: a bare pickled list of {len(loaded)} tensors without key names "
                             "(cloneofsimo lora_diffusion .pt); nothing says which module each belongs to")
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise LoraschedError(f"{path}: the pickle holds a {type(loaded).__name__}, not a dict of tensors")
    return dict(loaded)


def read_tensors(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and `__metadata__` of a safetensors file, with one-line errors for what is not one.

    Pickles (`.bin`, `.pt`) are refused unless `allow_pickle`; then they are read with `weights_only=True`.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraschedError(f"{path}: no such file")
    if path.suffix in PICKLE_SUFFIXES:
        if allow_pickle:
            return _read_pickle(path), {}
        raise LoraschedError(f"{path}: pickle files are not read by default (they can run code); convert it to "
                             ".safetensors, or pass --allow-pickle to read it with torch.load(weights_only=True)")
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
    extra = riders(tensors)
    keys = [key for key in tensors if key not in extra]
    besides = f" (besides {describe_riders(extra)})" if extra else ""
    for marker, family in UNSUPPORTED_MARKERS.items():
        if any(marker in key for key in keys):
            raise LoraschedError(f"{path}: {family} weights are not supported (plain LoRA only)")
    for matches, problem in FOREIGN_LAYOUTS:
        if keys and matches(keys):
            doubled = ", doubled `lora_unet_unet_` prefix" if any(k.startswith("lora_unet_unet_") for k in keys) else ""
            raise LoraschedError(f"{path}: {problem.format(doubled=doubled)}{besides}")
    if not any(marker in key for key in keys for marker in LORA_MARKERS):
        raise LoraschedError(f"{path}: holds no LoRA factors{besides} (is it a full checkpoint rather than a LoRA?)")
    for key in keys:
        tensor = tensors[key]
        if key.endswith(".alpha"):
            if tensor.numel() != 1:
                raise LoraschedError(f"{path}: alpha {key} has {tensor.numel()} values, not one number")
        elif not tensor.is_floating_point() or tensor.ndim < 2:
            raise LoraschedError(f"{path}: tensor {key} is not a floating-point factor matrix "
                                 f"({str(tensor.dtype).removeprefix('torch.')}, shape {tuple(tensor.shape)})")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LoraschedError(f"{path}: tensor {key} holds NaN or infinite values")


def riders(tensors) -> list[str]:
    """Keys of tensors that ride along in a LoRA file without being LoRA factors (textual-inversion embeddings)."""
    return sorted(key for key in tensors if RIDER.match(key))


def describe_riders(keys: list[str]) -> str:
    shown = ", ".join(keys[:4]) + (", …" if len(keys) > 4 else "")
    return f"{len(keys)} textual-inversion embedding tensor{'s' if len(keys) > 1 else ''}: {shown}"


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
        model = getattr(pipe, component)
        for name, module in model.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if lora_a is not None and adapter in lora_a:
                yield canonical_name(component, model, name), module


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
        """The factors' promoted dtype; scalar `.alpha` tensors (often float32 in fp16 files) do not count."""
        factors = [t.dtype for t in self.tensors.values() if t.is_floating_point() and t.ndim >= 2]
        return functools.reduce(torch.promote_types, factors)


def open_lora(path: str | Path, allow_pickle: bool = False) -> RawLora:
    """Read and check a LoRA file: every problem found here is a one-line `LoraschedError`."""
    tensors, metadata = read_tensors(path, allow_pickle)
    check_lora_tensors(path, tensors)
    extra = riders(tensors)  # embeddings need a tokenizer, not a LoRA loader: not merged
    return RawLora(Path(path), {k: v for k, v in tensors.items() if k not in extra}, metadata)


ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' own key: the LoraConfig a PEFT-format file was saved with
PEFT_WRAPPER_PREFIX = "base_model.model"  # raw PEFT `adapter_model.safetensors` of a bare denoiser


def adapter_config(raw: RawLora) -> dict | None:
    """The LoraConfig kwargs diffusers saved with the file (sets its alpha), if any."""
    text = raw.metadata.get(ADAPTER_METADATA)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise LoraschedError(f"{raw.path}: its {ADAPTER_METADATA} metadata is not JSON") from exc


def denoiser_prefix(keys) -> str | None:
    """The prefix of a denoiser-relative file (`down_blocks.…`, `base_model.model.down_blocks.…`), as diffusers'
    model-level `load_lora_adapter(prefix=…)` takes it."""
    return PEFT_WRAPPER_PREFIX if all(k.startswith(PEFT_WRAPPER_PREFIX + ".") for k in keys) else None


def _load(raw: RawLora, skeleton, adapter: str) -> None:
    """Pipeline-level loading converts every pipeline-level key format; a file that adapts nothing that way holds
    keys relative to the denoiser alone (saved from the bare UNet/transformer) and goes to the model's loader."""
    config = adapter_config(raw)
    if config is None:
        skeleton.load_lora_weights(fold_kohya_alphas(raw.tensors), adapter_name=adapter, low_cpu_mem_usage=True)
    else:  # from the path, so that diffusers applies the saved config (its alpha) itself
        skeleton.load_lora_weights(str(raw.path), adapter_name=adapter, low_cpu_mem_usage=True)
    if next(_adapted_layers(skeleton, adapter), None) is None:
        denoiser = getattr(skeleton, denoiser_name(skeleton))
        denoiser.load_lora_adapter(dict(raw.tensors), prefix=denoiser_prefix(raw.tensors), adapter_name=adapter,
                                   metadata=config, low_cpu_mem_usage=True)


def read_lora(raw: RawLora, skeleton, adapter: str) -> LoraFile:
    """Map `raw` onto the skeleton pipeline as `adapter`; every module must exist in the base with its shape."""
    path, dtype = raw.path, raw.dtype
    with collected_loading_messages() as messages:
        try:
            _load(raw, skeleton, adapter)
        except LoraschedError:
            raise
        except Exception as exc:  # diffusers/PEFT raise many types for a LoRA that does not fit
            raise LoraschedError(f"{path}: does not fit this base model ({_reason(exc)})") from exc
    unexpected = key_problems(messages)
    if unexpected:
        raise LoraschedError(f"{path}: keys that match no module of this base ({unexpected[0][:240]})")
    modules = _read_back(path, skeleton, adapter)
    if not modules:
        raise LoraschedError(f"{path}: no module of this base is adapted by it (a LoRA for another architecture?)")
    return LoraFile(path=str(path), sha256=file_sha256(path), dtype=dtype, modules=modules, metadata=raw.metadata)


def read_pair(base: str, subject: str, style: str, allow_pickle: bool = False) -> LoraPair:
    """Both LoRAs checked, then read onto one skeleton of the base in their own (promoted) dtype; see base.py."""
    from diffusers import StableDiffusionXLPipeline

    raw_subject, raw_style = open_lora(subject, allow_pickle), open_lora(style, allow_pickle)
    skeleton = load_skeleton(base, torch.promote_types(raw_subject.dtype, raw_style.dtype))
    pair = LoraPair(
        subject=read_lora(raw_subject, skeleton, SUBJECT),
        style=read_lora(raw_style, skeleton, STYLE),
        denoiser=denoiser_name(skeleton),
        pipeline_class=type(skeleton).__name__,
        single_text_encoder=getattr(skeleton, "text_encoder_2", None) is None,
        sgm=SgmLayout.of(skeleton.unet.config) if isinstance(skeleton, StableDiffusionXLPipeline) else None,
    )
    if not pair.both_adapted:
        raise LoraschedError(f"{style}: adapts no denoiser module that {subject} adapts; nothing to schedule")
    return pair
