"""Reading LoRA files of any format diffusers understands onto a base: the files, their checks, and the pair.

diffusers converts the key format through the base pipeline's own `load_lora_weights` (see `adapters.py`); what
comes back, per module, is exactly the factors and scaling a real load would use, without a load. No key surgery
lives here, only the checks that give clear errors.

The factors stay in the files. diffusers is handed stand-ins (meta tensors: shapes and dtypes, no data) for them;
when its conversion only renames keys, as for every layout but the FLUX trainers' fused ones, each module's
factors are read from the file when a rule or the exporter asks for them (`StoredFactor`), so a merge holds one
module's numbers at a time. A conversion that computes on the values gets the real tensors instead, held in memory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import lycoris
from .adapters import adapted
from .base import Skeleton, load_skeleton
from .checks import LoraSpec
from .errors import LoraschedError
from .lora import STYLE, SUBJECT, LoraFile, LoraModule, LoraSet, Source, denoiser_name
from .names import SgmLayout
from .quiet import collected_loading_messages
from .tensorfile import TensorFile

LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "_lora.down", "_lora.up", ".lora.down", ".lora.up",
                "_lora1.down", "_lora2.down")  # the last two: XLabs FLUX (`processor.qkv_lora1.down.weight`)
# Tensors that ride along in some LoRA files without being LoRA factors: textual-inversion embeddings saved by
# pivotal tuning (cloneofsimo `<s1>`, kohya `bundle_emb.<token>.…`). Layouts are recognised without them.
RIDER = re.compile(r"^<[^>]+>$|^bundle_emb\.")
MIN_MAX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what torch.aminmax reduces
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


def open_tensors(path: str | Path, allow_pickle: bool = False) -> tuple[Mapping[str, torch.Tensor], dict[str, str]]:
    """Tensors and `__metadata__` of a safetensors file, with one-line errors for what is not one. The tensors of a
    safetensors file are read from it on each access (`StoredTensors`); a pickle's are in memory.

    Pickles (`.bin`, `.pt`) are refused unless `allow_pickle`; then they are read with `weights_only=True`.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraschedError(f"{path}: no such file")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoraschedError(f"{path}: pickle files are not read by default (they can run code); convert it to "
                                 ".safetensors, or pass --allow-pickle to read it with torch.load(weights_only=True)")
        return _read_pickle(path), {}
    try:
        with safe_open(path, "pt") as handle:  # checks the header and that the data covers it
            metadata = handle.metadata() or {}
        return StoredTensors(TensorFile(path)), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoraschedError(f"{path}: not a readable safetensors file ({reason})") from exc


def read_tensors(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`open_tensors` with every tensor read."""
    tensors, metadata = open_tensors(path, allow_pickle)
    return dict(tensors), metadata


class StoredTensors(Mapping):
    """The tensors of a safetensors file by key, each read from the file when looked up (a new tensor each time)."""

    def __init__(self, file: TensorFile, keys: Iterable[str] | None = None) -> None:
        self.file = file
        self._keys = dict.fromkeys(file.keys() if keys is None else keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self.file.read(key)

    def __contains__(self, key) -> bool:  # Mapping's own would read the tensor
        return key in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def without(self, keys: Iterable[str]) -> StoredTensors:
        dropped = set(keys)
        return StoredTensors(self.file, [key for key in self._keys if key not in dropped])


def check_lora_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse what is not a plain LoRA before diffusers sees it: empty, unsupported families, malformed factors or
    alphas, and non-finite values of tensors in memory (a stored file's values are checked by `scan`)."""
    if not tensors:
        raise LoraschedError(f"{path}: holds no tensors")
    extra = riders(tensors)
    keys = [key for key in tensors if key not in extra]
    besides = f" (besides {describe_riders(extra)})" if extra else ""
    for matches, problem in FOREIGN_LAYOUTS:
        if keys and matches(keys):
            doubled = ", doubled `lora_unet_unet_` prefix" if any(k.startswith("lora_unet_unet_") for k in keys) else ""
            raise LoraschedError(f"{path}: {problem.format(doubled=doubled)}{besides}")
    if not any(marker in key for key in keys for marker in LORA_MARKERS):
        raise LoraschedError(f"{path}: holds no LoRA factors{besides} (is it a full checkpoint rather than a LoRA?)")
    for key in keys:
        dtype, shape = _described(tensors, key)
        if key.endswith(".alpha"):
            if math.prod(shape) != 1:
                raise LoraschedError(f"{path}: alpha {key} has {math.prod(shape)} values, not one number")
        elif not dtype.is_floating_point or len(shape) < 2:
            raise LoraschedError(f"{path}: tensor {key} is not a floating-point factor matrix "
                                 f"({str(dtype).removeprefix('torch.')}, shape {shape})")
    if not isinstance(tensors, StoredTensors):
        for key in keys:
            _check_finite(path, key, tensors[key])


def _check_finite(path: str | Path, key: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not all_finite(tensor):
        raise LoraschedError(f"{path}: tensor {key} holds NaN or infinite values")


def _described(tensors: Mapping[str, torch.Tensor], key: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """A tensor's dtype and shape, from the header for a stored file."""
    if isinstance(tensors, StoredTensors):
        entry = tensors.file.entries[key]
        return entry.dtype, entry.shape
    return tensors[key].dtype, tuple(tensors[key].shape)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. The minimum and maximum propagate a NaN and reach an infinity, so two finite
    extremes (one reduction, no widening: a tenth of a float32 sum's time for fp16) prove them all finite. Other
    dtypes (float8): a NaN or an infinity makes the float32 sum NaN or infinite, and only a sum that overflowed is
    looked at value by value."""
    if tensor.numel() == 0:
        return True
    if tensor.dtype in MIN_MAX_DTYPES:
        return all(math.isfinite(float(extreme)) for extreme in torch.aminmax(tensor))
    return math.isfinite(float(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def riders(tensors) -> list[str]:
    """Keys of tensors that ride along in a LoRA file without being LoRA factors (textual-inversion embeddings)."""
    return sorted(key for key in tensors if RIDER.match(key))


def describe_riders(keys: list[str]) -> str:
    shown = ", ".join(keys[:4]) + (", …" if len(keys) > 4 else "")
    return f"{len(keys)} textual-inversion embedding tensor{'s' if len(keys) > 1 else ''}: {shown}"


def kohya_folds(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, float]]:
    """{down key: (its `.alpha` key, alpha / r)} for each kohya `.alpha` with a `lora_down` beside it.

    The file means ΔW = alpha / r · up · down per module. diffusers 0.42 maps the alphas of SD/SDXL kohya files
    onto PEFT's `alpha_pattern` under names that match no module, so every module silently gets the most common
    alpha; a down folded with its alpha (down · alpha / r, in the file's dtype) and no alpha key loads at scale 1
    per module, which is exact. Only the alpha scalars are read here.
    """
    folds = {}
    for key in [k for k in tensors if k.endswith(".alpha")]:
        down_key = key.removesuffix(".alpha") + ".lora_down.weight"
        if down_key in tensors:
            folds[down_key] = (key, float(tensors[key]) / _described(tensors, down_key)[1][0])
    return folds


def _reason(exc: Exception) -> str:
    """The most telling line of a loader's error (a size mismatch names the module and both shapes)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    telling = [line for line in lines if "size mismatch" in line or "not found" in line]
    return (telling or lines)[0][:300]


@dataclass
class RawLora:
    """A LoRA file's tensors as stored (read on access from a safetensors file), checked but not yet mapped onto a
    base."""

    path: Path
    tensors: Mapping[str, torch.Tensor]
    metadata: dict[str, str]
    family: str | None = None  # LyCORIS family the tensors were converted from

    @property
    def dtype(self) -> torch.dtype:
        """The factors' promoted dtype; scalar `.alpha` tensors (often float32 in fp16 files) do not count."""
        if isinstance(self.tensors, StoredTensors):
            entries = [self.tensors.file.entries[key] for key in self.tensors]
            factors = [e.dtype for e in entries if e.dtype.is_floating_point and len(e.shape) >= 2]
        else:
            factors = [t.dtype for t in self.tensors.values() if t.is_floating_point() and t.ndim >= 2]
        return functools.reduce(torch.promote_types, factors)


def lora_factors(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> tuple[Mapping[str, torch.Tensor], str | None]:
    """A file's tensors as the LoRA factors lorasched reads (LyCORIS LoKr/LoHa converted, `lycoris.py`), checked,
    and the LyCORIS family they came from (None for a LoRA)."""
    try:
        family = lycoris.kind(tensors)
        if family is not None:
            tensors = lycoris.to_lora(tensors, family)
    except LoraschedError as exc:
        raise LoraschedError(f"{path}: {exc}") from None
    check_lora_tensors(path, tensors)
    return tensors, family


def open_lora(path: str | Path, allow_pickle: bool = False) -> RawLora:
    """Open and check a LoRA file: every problem found here is a one-line `LoraschedError`. A safetensors file's
    values are checked by `scan`, in the same read that hashes it."""
    tensors, metadata = open_tensors(path, allow_pickle)
    tensors, family = lora_factors(path, tensors)
    extra = riders(tensors)  # embeddings need a tokenizer, not a LoRA loader: not merged
    if isinstance(tensors, StoredTensors):
        return RawLora(Path(path), tensors.without(extra), metadata, family)
    return RawLora(Path(path), {k: v for k, v in tensors.items() if k not in extra}, metadata, family)


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


@dataclass(frozen=True)
class StoredFactor:
    """A factor read from its file on each access as a load would hold it: folded with its kohya alpha, then cast
    to its base layer's dtype (a widening, so exact)."""

    file: TensorFile
    key: str
    fold: float | None
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.file.entries[self.key].shape)

    def load(self) -> torch.Tensor:
        tensor = self.file.read(self.key)
        if self.fold is not None:
            tensor.mul_(self.fold)
        return tensor.to(self.dtype)


class _Computed(Exception):
    """diffusers' conversion computed on the values: it needs the real tensors."""


def _stand_ins(raw: RawLora, folds: dict) -> tuple[dict, dict[int, str]]:
    """The state dict diffusers is handed first: a meta tensor for each factor (scalars read), and which key each
    stand-in is."""
    tensors, alphas = raw.tensors, {alpha for alpha, _ in folds.values()}
    state, origin = {}, {}
    for key in tensors:
        if key in alphas:
            continue
        if len(tensors.file.entries[key].shape) >= 2:
            state[key] = tensors.file.meta(key)
            origin[id(state[key])] = key
        else:
            state[key] = tensors[key]
    return state, origin


def _in_memory(raw: RawLora, folds: dict) -> dict:
    """The real tensors, alphas folded into their downs (in the file's dtype) and dropped."""
    alphas = {alpha for alpha, _ in folds.values()}
    state = {key: raw.tensors[key] for key in raw.tensors if key not in alphas}
    for down_key, (_, factor) in folds.items():
        state[down_key] = state[down_key] * factor
    return state


def _modules(raw: RawLora, skeleton: Skeleton, adapter: str, stand_ins: bool) -> dict[str, LoraModule]:
    folds = kohya_folds(raw.tensors)
    state, origin = _stand_ins(raw, folds) if stand_ins else (_in_memory(raw, folds), {})
    found = adapted(skeleton, state, adapter_config(raw), adapter, str(raw.path), denoiser_prefix(state))
    if not stand_ins:
        return {m.name: LoraModule(m.down.to(m.dtype), m.up.to(m.dtype), m.scale) for m in found}
    modules = {}
    for m in found:
        keys = [origin.get(id(m.down)), origin.get(id(m.up))]
        if None in keys:
            raise _Computed(m.name)
        down, up = (StoredFactor(raw.tensors.file, key, folds.get(key, (None, None))[1], m.dtype) for key in keys)
        modules[m.name] = LoraModule(down, up, m.scale)
    return modules


def _read_modules(raw: RawLora, skeleton: Skeleton, adapter: str) -> dict[str, LoraModule]:
    """Stand-ins first; the real tensors when the conversion computes on the values (it then builds tensors of its
    own, or fails on a stand-in that has no data)."""
    if isinstance(raw.tensors, StoredTensors):
        try:
            return _modules(raw, skeleton, adapter, stand_ins=True)
        except LoraschedError:  # keys or shapes: the real tensors would fail alike
            raise
        except Exception:  # _Computed, or a conversion that failed on data a stand-in lacks: retried for real
            pass
    return _modules(raw, skeleton, adapter, stand_ins=False)


def read_modules(raw: RawLora, skeleton: Skeleton, adapter: str) -> dict[str, LoraModule]:
    """Map `raw` onto the skeleton as loading it under the adapter name `adapter` would; every module must exist in
    the base with its shape."""
    with collected_loading_messages():
        try:
            modules = _read_modules(raw, skeleton, adapter)
        except LoraschedError:
            raise
        except Exception as exc:  # diffusers raises many types for a LoRA that does not fit
            raise LoraschedError(f"{raw.path}: does not fit this base model ({_reason(exc)})") from exc
    if not modules:
        raise LoraschedError(f"{raw.path}: no module of this base is adapted by it (a LoRA for another "
                             "architecture?)")
    return modules


def scan(raw: RawLora) -> str:
    """The file's sha256; a safetensors file's values are checked to be finite on the same read."""
    if not isinstance(raw.tensors, StoredTensors):
        return file_sha256(raw.path)

    def check(key: str, tensor: torch.Tensor) -> None:
        if key in raw.tensors:  # riders are not merged, so not checked
            _check_finite(raw.path, key, tensor)

    return raw.tensors.file.sha256(check)


def read_lora(raw: RawLora, skeleton: Skeleton, adapter: str) -> LoraFile:
    """`read_modules`, with the file's hash (and so its values checked) and dtype."""
    digest = scan(raw)
    return LoraFile(path=str(raw.path), sha256=digest, dtype=raw.dtype, modules=read_modules(raw, skeleton, adapter),
                    metadata=raw.metadata, family=raw.family)


def _strengthened(lora: LoraFile, strength: float) -> LoraFile:
    """The LoRA with its delta multiplied by `strength` (in each module's scale, so factors stay where they are)."""
    if strength == 1.0:
        return lora
    return replace(lora, modules={name: module.replaced(scale=module.scale * strength)
                                  for name, module in lora.modules.items()})


def read_set(base: str, specs: list[LoraSpec], allow_pickle: bool = False) -> LoraSet:
    """Every LoRA checked, then read onto one skeleton of the base in their own (promoted) dtype; see base.py."""
    raws = [open_lora(spec.path, allow_pickle) for spec in specs]
    # The files are hashed and checked (reads, hashlib and torch free the GIL) while diffusers is imported (first in
    # load_skeleton) and the skeleton built.
    with ThreadPoolExecutor(2) as scanning:
        scans = [scanning.submit(scan, raw) for raw in raws]
        skeleton = load_skeleton(base, functools.reduce(torch.promote_types, (raw.dtype for raw in raws)))
        digests = [future.result() for future in scans]
    for index, digest in enumerate(digests):
        if digest in digests[:index]:
            first = specs[digests.index(digest)]
            raise LoraschedError(f"{specs[index].path}: is the same file as {first.path} (same sha256); give each "
                                 "LoRA once")
    sources = tuple(
        Source(_strengthened(LoraFile(path=str(raw.path), sha256=digest, dtype=raw.dtype,
                                      modules=read_modules(raw, skeleton, f"source{index}"), metadata=raw.metadata,
                                      family=raw.family),
                             spec.strength), spec.role, spec.strength)
        for index, (spec, raw, digest) in enumerate(zip(specs, raws, digests))
    )
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin

    loras = LoraSet(
        sources=sources,
        denoiser=denoiser_name(skeleton),
        pipeline_class=skeleton.pipeline_class,
        single_text_encoder="text_encoder_2" not in skeleton.components,
        sgm=SgmLayout.of(skeleton.unet.config) if issubclass(skeleton.loader, StableDiffusionXLLoraLoaderMixin)
        else None,
    )
    if not loras.decided:
        subjects = ", ".join(spec.path for spec in specs if spec.role == SUBJECT)
        styles = ", ".join(spec.path for spec in specs if spec.role == STYLE)
        raise LoraschedError(f"{styles}: adapts no denoiser module that {subjects} adapts; nothing to schedule")
    return loras


def read_pair(base: str, subject: str, style: str, allow_pickle: bool = False) -> LoraSet:
    """A subject and a style LoRA (`read_set` of the two)."""
    return read_set(base, [LoraSpec(subject, SUBJECT), LoraSpec(style, STYLE)], allow_pickle)
