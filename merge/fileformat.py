"""The scheduled LoRA file: metadata schema, tensor hash, deterministic atomic write, and reading it back.

Shared by the exporter and the replay hook so the two cannot drift apart. Import-light on purpose (torch,
safetensors, json): the replay hook imports it in deployments without the converter's extras.
See docs/FORMAT.md for the schema.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

NAMESPACE = "lorasched"
FORMAT_VERSION = "1"
KEY_VERSION = f"{NAMESPACE}.format_version"
KEY_METHOD = f"{NAMESPACE}.method"
KEY_PARAMS = f"{NAMESPACE}.params"
KEY_SOURCES = f"{NAMESPACE}.sources"
KEY_SCHEDULE = f"{NAMESPACE}.schedule"
KEY_MODULES = f"{NAMESPACE}.modules"
KEY_TENSOR_HASH = f"{NAMESPACE}.tensor_sha256"
KEY_TENSOR_FORMAT = f"{NAMESPACE}.tensor_format"  # `kohya` (also when absent) or `diffusers`
PEFT_TO_HOOK = ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight"))


class FormatError(ValueError):
    """The file is not a lorasched file, or its weights no longer match its schedule."""


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes of every tensor, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sort_header(path: Path) -> None:
    """Re-serialise a safetensors header with its `__metadata__` in sorted key order.

    safetensors writes `__metadata__` in hash-map order, which changes from run to run; sorting it makes the same
    inputs give a byte-identical file. Data offsets are relative to the end of the header, so only the header
    and its padding change: in place when the length is unchanged (the usual case), else by a streamed copy.
    """
    with open(path, "r+b") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)
        if len(raw) == size:
            handle.seek(8)
            handle.write(raw)
            return
        copy = path.with_suffix(".sorted")
        with open(copy, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                out.write(chunk)
    os.replace(copy, path)


def write(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically (a temp file in the target folder, then rename): no half-written output ever exists."""
    path = Path(path)
    metadata = {**metadata, KEY_VERSION: FORMAT_VERSION, KEY_TENSOR_HASH: tensor_sha256(tensors)}
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, temp, metadata=metadata)
        _sort_header(Path(temp))
        os.replace(temp, path)
    finally:
        for leftover in (temp, temp.removesuffix(".tmp") + ".sorted"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def _hook_name(key: str) -> str:
    """`<module>.lora_A.weight` -> `<module>.lora_down.weight`: the hook reads every format by the record key."""
    for peft, hook in PEFT_TO_HOOK:
        if key.endswith(peft):
            return key.removesuffix(peft) + hook
    return key


@dataclass(frozen=True)
class ScheduledFile:
    """What replay and inspect need from a file: parsed metadata, and the tensors when asked for."""

    path: str
    metadata: dict[str, str]
    method: str
    params: dict
    sources: dict
    modules: dict[str, dict]
    schedule_json: str
    tensors: dict[str, torch.Tensor] | None = None  # named `<record key>.lora_down/up.weight` whatever the format


def is_scheduled(path: str | Path) -> bool:
    """Whether a safetensors file carries lorasched metadata (any format version)."""
    with safe_open(os.fspath(path), "pt") as handle:
        return KEY_VERSION in (handle.metadata() or {})


def read(path: str | Path, with_tensors: bool = False) -> ScheduledFile:
    """Parse a lorasched file; with tensors, also refuse one whose tensor hash does not match its schedule."""
    with safe_open(os.fspath(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get(KEY_VERSION) is None:
        raise FormatError(f"{path}: not a lorasched file (no {KEY_VERSION} in its metadata)")
    if metadata[KEY_VERSION] != FORMAT_VERSION:
        raise FormatError(f"{path}: lorasched format {metadata[KEY_VERSION]} is not supported (need {FORMAT_VERSION})")
    tensors = None
    if with_tensors:
        tensors = load_file(os.fspath(path))
        if tensor_sha256(tensors) != metadata.get(KEY_TENSOR_HASH):
            raise FormatError(f"{path}: tensor hash does not match the schedule (weights changed after export)")
        if metadata.get(KEY_TENSOR_FORMAT) == "diffusers":
            tensors = {_hook_name(key): tensor for key, tensor in tensors.items()}
    return ScheduledFile(
        path=os.fspath(path),
        metadata=metadata,
        method=metadata[KEY_METHOD],
        params=json.loads(metadata[KEY_PARAMS]),
        sources=json.loads(metadata[KEY_SOURCES]),
        modules=json.loads(metadata[KEY_MODULES]),
        schedule_json=metadata[KEY_SCHEDULE],
        tensors=tensors,
    )
