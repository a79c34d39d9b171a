"""Reading a lorasched file: metadata, tensor hash, and each module's per-source factors.

torch + safetensors + json only, so the node pack works when copied alone into `custom_nodes/`. It mirrors
lorasched's `merge/fileformat.py` (schema, hash) and `merge/replay.py:source_factors` (undoing the rank
concatenation); the format is docs/FORMAT.md. Formats 1 (a subject/style pair, phases by name) and 2 (N sources,
phases by index) become one structure: per module, per source index, factors; phases as tuples of indices.
Unknown metadata fields are ignored, so newer files with extra fields still load.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file

FORMAT_VERSIONS = ("1", "2")
KEY_VERSION = "lorasched.format_version"
KEY_SOURCES = "lorasched.sources"
KEY_SCHEDULE = "lorasched.schedule"
KEY_MODULES = "lorasched.modules"
KEY_TENSOR_HASH = "lorasched.tensor_sha256"
KEY_TENSOR_FORMAT = "lorasched.tensor_format"
PAIR_ROLES = ("subject", "style")  # format 1's two sources, in order
PAIR_SELECTIONS = {"subject": (0,), "style": (1,), "both": (0, 1)}  # format 1's phase names
AXES = ("progress", "noise")
DENOISERS = ("unet", "transformer")  # the pipeline component that runs once per denoising step
FACTOR_SUFFIXES = {"kohya": (".lora_down.weight", ".lora_up.weight"), "diffusers": (".lora_A.weight", ".lora_B.weight")}
LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", ".alpha", "lora.down", "lora.up", "hada_", "lokr_")


class ScheduledLoraError(ValueError):
    """The file cannot be replayed: not a lorasched file, changed after export, or not for this model."""


Selection = tuple[int, ...]  # the indices of the sources active, ascending; () is no LoRA
Phases = tuple[tuple[float, Selection], ...]


@dataclass(frozen=True)
class Source:
    """One input LoRA of the file, for messages: its file name and role (subject, style or static)."""

    file: str
    role: str

    def describe(self, index: int) -> str:
        return f"the {self.role} LoRA {self.file} (source {index})"


@dataclass(frozen=True)
class Module:
    """One adapted layer: its key in the file, its schedule, and per source (down, up) with ΔW = up @ down."""

    name: str  # diffusers pipeline path, component first: `unet.down_blocks.0.attentions.0…attn1.to_q`
    key: str  # the file's name for it: kohya `lora_unet_…` or diffusers `transformer.…`
    phases: Phases
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]]  # by source index, sources that adapt it only

    @property
    def is_denoiser(self) -> bool:
        return self.name.split(".", 1)[0] in DENOISERS

    @property
    def switches(self) -> bool:
        return len(self.phases) > 1

    def selection_at(self, time: float) -> Selection:
        """The phase's sources at `time` on the schedule's axis (a phase runs from its start to the next start)."""
        starts = [start for start, _ in self.phases]
        return self.phases[bisect.bisect_right(starts, time) - 1][1]


@dataclass(frozen=True)
class ScheduledLora:
    """A checked file: its schedule's time axis and every scheduled layer; `metadata` for messages."""

    path: str
    axis: str  # `progress` (p = n / N) or `noise` (q = 1 - t / T_train)
    sources: tuple[Source, ...]
    modules: dict[str, Module]
    metadata: dict[str, str]


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Exactly lorasched's `fileformat.tensor_sha256`: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def error(path: str, problem: str) -> ScheduledLoraError:
    """The node's error: the file's name, then the problem and what to do."""
    return ScheduledLoraError(f"{os.path.basename(path)}: {problem}")


def _metadata(path: str) -> tuple[dict[str, str], list[str]]:
    try:
        with safe_open(path, "pt") as handle:
            return handle.metadata() or {}, list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for non-safetensors bytes
        raise error(path, f"not a readable .safetensors file ({exc})") from None


def _json(path: str, metadata: dict[str, str], key: str):
    try:
        return json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError) as exc:
        raise error(path, f"lorasched metadata {key} is missing or not JSON ({exc}); re-export the file") from None


def _sources(path: str, metadata: dict[str, str], named: bool) -> tuple[Source, ...]:
    """The sources in file order; format 1's {"subject": …, "style": …} object is sources 0 and 1."""
    raw = _json(path, metadata, KEY_SOURCES)
    if named and isinstance(raw, dict):
        raw = [{**(raw[role] if isinstance(raw.get(role), dict) else {}), "role": role} for role in PAIR_ROLES]
    if not (isinstance(raw, list) and raw and all(
            isinstance(info, dict) and isinstance(info.get("file"), str) and isinstance(info.get("role"), str)
            for info in raw)):
        raise error(path, f"lorasched metadata {KEY_SOURCES} does not name each source's file and role; "
                          "re-export the file")
    return tuple(Source(info["file"], info["role"]) for info in raw)


def _selection(value, named: bool) -> Selection | None:
    """A phase's sources: format 1 names them, format 2 lists their indices ascending; None if it is neither."""
    if named:
        return PAIR_SELECTIONS.get(value) if isinstance(value, str) else None
    if not (isinstance(value, list) and all(type(index) is int for index in value)):
        return None
    return tuple(value) if value == sorted(set(value)) else None


def _phases(path: str, name: str, raw, sources: int, named: bool) -> Phases:
    try:
        phases = tuple((float(start), _selection(value, named)) for start, value in raw)
    except (TypeError, ValueError):
        phases = None
    if phases is None or any(selection is None for _, selection in phases):
        shape = "subject|style|both" if named else "[source index, …] ascending"
        raise error(path, f"schedule of {name} is not a list of [start, {shape}] pairs")
    starts = [start for start, _ in phases]
    if not phases or starts[0] != 0.0 or starts != sorted(starts):
        raise error(path, f"schedule of {name} must start at 0 and be sorted, got {list(phases)}")
    unknown = sorted({index for _, selection in phases for index in selection if not 0 <= index < sources})
    if unknown:
        raise error(path, f"schedule of {name} uses unknown source(s) {unknown}; the file lists {sources} sources")
    return phases


def _factors(path: str, name: str, record: dict, down: torch.Tensor, up: torch.Tensor,
             sources: tuple[Source, ...]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Split the concatenated rank back per source and divide the static weight out (the file stores
    down = [c_0·A_0 ; c_1·A_1 ; …], up = [B_0 | B_1 | …], a source that does not adapt the module at rank 0)."""
    try:
        ranks = [int(rank) for rank in record["ranks"]]
        static = [float(weight) for weight in record["static"]]
    except (KeyError, TypeError, ValueError):
        raise error(path, f"module record of {name} lacks ranks/static") from None
    if len(ranks) != len(sources) or len(static) != len(sources):
        raise error(path, f"module record of {name} has {len(ranks)} ranks and {len(static)} static weights for "
                          f"{len(sources)} sources; re-export the file")
    if not sum(ranks) or sum(ranks) != down.shape[0] or sum(ranks) != up.shape[1]:
        raise error(path, f"{name}: ranks {ranks} do not match its factors {tuple(down.shape)} / {tuple(up.shape)}")
    factors, offset = {}, 0
    for index, (rank, weight) in enumerate(zip(ranks, static)):
        if rank:
            if weight == 0.0:
                raise error(path, f"{name}: {sources[index].describe(index)} has rank {rank} but static weight 0")
            factors[index] = (down[offset : offset + rank].float() / weight, up[:, offset : offset + rank].float())
            offset += rank
    return factors


def read(path: str) -> ScheduledLora:
    """Parse and check a lorasched file; every failure is a ScheduledLoraError naming the file and the fix."""
    metadata, keys = _metadata(path)
    if KEY_VERSION not in metadata:
        if any(marker in key for key in keys for marker in LORA_MARKERS):
            raise error(path, "a plain LoRA, not a lorasched scheduled LoRA (no lorasched metadata); "
                               "load it with ComfyUI's LoraLoader")
        raise error(path, "not a lorasched scheduled LoRA (no lorasched.format_version in its metadata)")
    version = metadata[KEY_VERSION]
    if version not in FORMAT_VERSIONS:
        raise error(path, f"lorasched format {version} is not supported by this node (it reads formats "
                           f"{', '.join(FORMAT_VERSIONS)}); update comfyui-lorasched")
    named = version == "1"
    tensors = load_file(path)
    if tensor_sha256(tensors) != metadata.get(KEY_TENSOR_HASH):
        raise error(path, "tensor hash does not match lorasched.tensor_sha256: the weights were changed after "
                           "export (re-saved, pruned or re-quantised); export the file again with lorasched")
    sources = _sources(path, metadata, named)
    schedule, records = _json(path, metadata, KEY_SCHEDULE), _json(path, metadata, KEY_MODULES)
    axis = schedule.get("axis")
    if axis not in AXES:
        raise error(path, f"schedule axis {axis!r} is not supported (expected one of {list(AXES)})")
    down_suffix, up_suffix = FACTOR_SUFFIXES.get(metadata.get(KEY_TENSOR_FORMAT, "kohya"), FACTOR_SUFFIXES["kohya"])
    modules = {}
    for name, raw in schedule.get("layers", {}).items():
        record = records.get(name)
        if record is None or "key" not in record:
            raise error(path, f"scheduled layer {name} has no module record")
        key = record["key"]
        down, up = tensors.get(key + down_suffix), tensors.get(key + up_suffix)
        if down is None or up is None:
            raise error(path, f"factors {key}{down_suffix} / {key}{up_suffix} of {name} are missing")
        phases = _phases(path, name, raw, len(sources), named)
        factors = _factors(path, name, record, down, up, sources)
        missing = sorted({index for _, selection in phases for index in selection} - set(factors))
        if missing:
            raise error(path, f"{name}: the schedule uses {', '.join(sources[i].describe(i) for i in missing)} "
                              "but the file has no factors for it")
        modules[name] = Module(name, key, phases, factors)
    if not modules:
        raise error(path, "the schedule lists no layers")
    return ScheduledLora(path, axis, sources, modules, metadata)
