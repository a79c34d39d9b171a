"""Reading a lorasched file: metadata, tensor hash, and each module's per-source factors.

torch + safetensors + json only, so the node pack works when copied alone into `custom_nodes/`. It mirrors
lorasched's `merge/fileformat.py` (schema, hash) and `merge/replay.py:source_factors` (undoing the rank
concatenation); the format is docs/FORMAT.md. Unknown metadata fields are ignored, so newer files with extra
fields still load.
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

FORMAT_VERSION = "1"
KEY_VERSION = "lorasched.format_version"
KEY_SCHEDULE = "lorasched.schedule"
KEY_MODULES = "lorasched.modules"
KEY_TENSOR_HASH = "lorasched.tensor_sha256"
KEY_TENSOR_FORMAT = "lorasched.tensor_format"
SUBJECT, STYLE, BOTH = "subject", "style", "both"
SOURCES = (SUBJECT, STYLE)
ACTIVE = {SUBJECT: (SUBJECT,), STYLE: (STYLE,), BOTH: (SUBJECT, STYLE)}
AXES = ("progress", "noise")
DENOISERS = ("unet", "transformer")  # the pipeline component that runs once per denoising step
FACTOR_SUFFIXES = {"kohya": (".lora_down.weight", ".lora_up.weight"), "diffusers": (".lora_A.weight", ".lora_B.weight")}
LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", ".alpha", "lora.down", "lora.up", "hada_", "lokr_")


class ScheduledLoraError(ValueError):
    """The file cannot be replayed: not a lorasched file, changed after export, or not for this model."""


Phases = tuple[tuple[float, str], ...]


@dataclass(frozen=True)
class Module:
    """One adapted layer: its key in the file, its schedule, and per source (down, up) with ΔW = up @ down."""

    name: str  # diffusers pipeline path, component first: `unet.down_blocks.0.attentions.0…attn1.to_q`
    key: str  # the file's name for it: kohya `lora_unet_…` or diffusers `transformer.…`
    phases: Phases
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def is_denoiser(self) -> bool:
        return self.name.split(".", 1)[0] in DENOISERS

    @property
    def switches(self) -> bool:
        return len(self.phases) > 1

    def source_at(self, time: float) -> str:
        """The phase's source at `time` on the schedule's axis (a phase runs from its start to the next start)."""
        starts = [start for start, _ in self.phases]
        return self.phases[bisect.bisect_right(starts, time) - 1][1]


@dataclass(frozen=True)
class ScheduledLora:
    """A checked file: its schedule's time axis and every scheduled layer; `metadata` for messages."""

    path: str
    axis: str  # `progress` (p = n / N) or `noise` (q = 1 - t / T_train)
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


def _phases(path: str, name: str, raw) -> Phases:
    try:
        phases = tuple((float(start), str(source)) for start, source in raw)
    except (TypeError, ValueError):
        raise error(path, f"schedule of {name} is not a list of [start, source] pairs") from None
    starts = [start for start, _ in phases]
    if not phases or starts[0] != 0.0 or starts != sorted(starts):
        raise error(path, f"schedule of {name} must start at 0 and be sorted, got {list(phases)}")
    unknown = {source for _, source in phases} - set(ACTIVE)
    if unknown:
        raise error(path, f"schedule of {name} uses unknown source(s) {sorted(unknown)}; "
                          f"expected one of {list(ACTIVE)}")
    return phases


def _factors(path: str, name: str, record: dict, down: torch.Tensor, up: torch.Tensor) -> dict:
    """Split the concatenated rank back per source and divide the static weight out (the file stores
    down = [c_c·A_c ; c_s·A_s], up = [B_c | B_s])."""
    try:
        ranks = [int(rank) for rank in record["ranks"]]
        static = [float(weight) for weight in record["static"]]
    except (KeyError, TypeError, ValueError):
        raise error(path, f"module record of {name} lacks ranks/static") from None
    if sum(ranks) != down.shape[0] or sum(ranks) != up.shape[1]:
        raise error(path, f"{name}: ranks {ranks} do not match its factors {tuple(down.shape)} / {tuple(up.shape)}")
    factors, offset = {}, 0
    for source, rank, weight in zip(SOURCES, ranks, static):
        if rank:
            if weight == 0.0:
                raise error(path, f"{name}: {source} has rank {rank} but static weight 0")
            factors[source] = (down[offset : offset + rank].float() / weight, up[:, offset : offset + rank].float())
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
    if metadata[KEY_VERSION] != FORMAT_VERSION:
        raise error(path, f"lorasched format {metadata[KEY_VERSION]} is not supported by this node "
                           f"(it reads format {FORMAT_VERSION}); update comfyui-lorasched")
    tensors = load_file(path)
    if tensor_sha256(tensors) != metadata.get(KEY_TENSOR_HASH):
        raise error(path, "tensor hash does not match lorasched.tensor_sha256: the weights were changed after "
                           "export (re-saved, pruned or re-quantised); export the file again with lorasched")
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
        phases = _phases(path, name, raw)
        factors = _factors(path, name, record, down, up)
        missing = {source for _, active in phases for source in ACTIVE[active]} - set(factors)
        if missing:
            raise error(path, f"{name}: the schedule uses {sorted(missing)} but the file has no factors for it")
        modules[name] = Module(name, key, phases, factors)
    if not modules:
        raise error(path, "the schedule lists no layers")
    return ScheduledLora(path, axis, modules, metadata)
