"""Writing the scheduled LoRA file (metadata, deterministic atomic streamed write) and reading it as the converter does.

The schema and the reader every consumer shares are `schema.py` (the replay hook and the host packs read with it);
this module adds what only lorasched itself checks: the method and its params, each method's own checks asked of
the method registry. docs/FORMAT.md is the schema.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import rules
from .errors import FormatError
from .rules.method import Method, ParamsCheck, finite
from .schedule import Schedule
from .schema import (FORMAT_VERSION, KEY_METHOD, KEY_MODULES, KEY_PARAMS, KEY_SCHEDULE, KEY_SOURCES,
                     KEY_TENSOR_FORMAT, KEY_TENSOR_HASH, KEY_VERSION, ScheduledFile, is_scheduled, tensor_sha256)
from .schema import read as read_schema
from .tensorfile import DTYPE_NAMES, LAYOUT_RANK

__all__ = ["FORMAT_VERSION", "KEY_METHOD", "KEY_MODULES", "KEY_PARAMS", "KEY_SCHEDULE", "KEY_SOURCES",
           "KEY_TENSOR_FORMAT", "KEY_TENSOR_HASH", "KEY_VERSION", "ScheduledFile", "TensorSpec", "is_scheduled",
           "pack", "read", "tensor_sha256", "write", "write_stream"]


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: name, dtype and shape up front, the values made (`make()`) only when their turn comes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _header(metadata: dict[str, str], specs: list[TensorSpec]) -> bytes:
    """safetensors' header for tensors laid out in `specs` order, `__metadata__` first with its keys sorted (so the
    same inputs give the same bytes), padded with spaces to a multiple of 8 as safetensors pads it."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return raw + b" " * (-len(raw) % 8)


def _tensor_bytes(spec: TensorSpec) -> memoryview:
    tensor = spec.make()
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise ValueError(f"{spec.name}: made {tensor.dtype} {tuple(tensor.shape)}, announced {spec.dtype} {spec.shape}")
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _digest_update(digest, spec: TensorSpec, data) -> None:
    """One tensor's share of `tensor_sha256`: its name, dtype, shape, then its bytes."""
    digest.update(f"{spec.name}|{spec.dtype}|{spec.shape}|".encode())
    digest.update(data)


def write_stream(path: str | Path, specs: list[TensorSpec], metadata: dict[str, str]) -> None:
    """Write a safetensors file one tensor at a time, atomically (a temp file in the target folder, then rename).

    The header goes first, with a placeholder of the tensor hash's length; then each tensor is made, written and
    dropped, in safetensors' own layout order (largest dtype first, then by name); then the tensor hash takes the
    placeholder's place. The bytes equal those of `safetensors.torch.save_file` of the same tensors and metadata
    with the header's metadata keys sorted. The hash is taken while writing when that order is the name order (one
    dtype, as every exported file), else by reading the written tensors back in name order.
    """
    path = Path(path)
    specs = sorted(specs, key=lambda spec: (LAYOUT_RANK[spec.dtype], spec.name))
    placeholder = "0" * 64
    raw = _header({**metadata, KEY_VERSION: FORMAT_VERSION, KEY_TENSOR_HASH: placeholder}, specs)
    hash_at = 8 + raw.index(json.dumps({KEY_TENSOR_HASH: placeholder}, separators=(",", ":"))[1:-1].encode()) + \
        len(json.dumps(KEY_TENSOR_HASH)) + 2
    in_name_order = [spec.name for spec in specs] == sorted(spec.name for spec in specs)
    digest = hashlib.sha256()
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "r+b") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for spec in specs:
                data = _tensor_bytes(spec)
                out.write(data)
                if in_name_order:
                    _digest_update(digest, spec, data)
            if not in_name_order:
                out.flush()
                starts, start = {}, 8 + len(raw)
                for spec in specs:
                    starts[spec.name], start = start, start + spec.nbytes
                for spec in sorted(specs, key=lambda spec: spec.name):
                    _digest_update(digest, spec, os.pread(out.fileno(), spec.nbytes, starts[spec.name]))
            out.seek(hash_at)
            out.write(digest.hexdigest().encode())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def write(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """`write_stream` of tensors already in memory."""
    write_stream(path, [TensorSpec(name, t.dtype, tuple(t.shape), lambda t=t: t) for name, t in tensors.items()],
                 metadata)


def pack(method: str, params: dict, sources: list[dict], schedule: Schedule, records: dict[str, dict],
         tensor_format: str) -> dict[str, str]:
    """The `lorasched.*` metadata of a file (version and tensor hash are added by `write`)."""
    return {
        KEY_METHOD: method,
        KEY_PARAMS: json.dumps(params, sort_keys=True),
        KEY_SOURCES: json.dumps(sources, sort_keys=True),
        KEY_SCHEDULE: schedule.to_json(),
        KEY_MODULES: json.dumps(records, sort_keys=True, separators=(",", ":")),
        KEY_TENSOR_FORMAT: tensor_format,
    }


def read(path: str | Path, with_tensors: bool = False) -> ScheduledFile:
    """`schema.read` (the schema every reader shares), then the method and its params as lorasched writes them:
    one `FormatError` line naming the file and the key."""
    scheduled = read_schema(path, with_tensors)
    check = _Checker(scheduled.path, scheduled.metadata)
    check.params(check.method(), scheduled.roles)
    return scheduled


NESTED_PARAMS = {  # records any method's params may hold (inspect shows them)
    "calibration": ("prompts", "seeds", "guidance", "size", "mean_agreement", "log"),
    "beta_source": ("similarity", "embedder", "prompt", "seed", "steps"),
    "balance": ("objective", "candidates", "chosen", "prompts", "seeds", "steps", "size", "clip", "dino", "log"),
    "rank": ("request", "max_error", "errors"),
}


class _Checker:
    """The method's params, checked key by key; the first problem raises with the key it is in."""

    def __init__(self, path: str, metadata: dict[str, str]) -> None:
        self.path, self.metadata = path, metadata

    def fail(self, key: str, problem: str):
        raise FormatError(f"{self.path}: metadata {key} {problem}")

    def json(self, key: str, kind: type):
        text = self.metadata.get(key)
        if text is None:
            self.fail(key, "is missing")
        try:
            value = json.loads(text)
        except ValueError:
            self.fail(key, "is not JSON")
        if not isinstance(value, kind):
            self.fail(key, f"is not a JSON {'object' if kind is dict else kind.__name__}")
        return value

    def method(self) -> Method:
        name = self.metadata.get(KEY_METHOD)
        if name not in rules.names():
            self.fail(KEY_METHOD, f"is {name!r}, not one of {', '.join(rules.names())}")
        return rules.get(name)

    def params(self, method: Method, roles: tuple[str, ...]) -> dict:
        params = self.json(KEY_PARAMS, dict)
        check = ParamsCheck(lambda problem: self.fail(KEY_PARAMS, problem))
        check.numbers(params, method.numbers, method.name)
        method.check_params(params, roles, check)
        if "steps" in params and not (isinstance(params["steps"], int) and params["steps"] >= 1):
            self.fail(KEY_PARAMS, f"has steps {params['steps']!r}, not a positive integer")
        if "gamma_scale" in params and not (finite(params["gamma_scale"]) and params["gamma_scale"] > 0):
            self.fail(KEY_PARAMS, f"has gamma_scale {params['gamma_scale']!r}, not a positive number")
        for name, fields in NESTED_PARAMS.items():
            if name in params and not (isinstance(params[name], dict) and set(fields) <= set(params[name])):
                if params[name] != "given":
                    self.fail(KEY_PARAMS, f"has a {name} without its fields ({', '.join(fields)})")
        if "balance" in params:
            self.balance(params["balance"])
        return params

    def balance(self, search: dict) -> None:
        """A `--balance auto` record: candidates with their knob values and finite scores, one of them chosen."""
        if not isinstance(search, dict):
            self.fail(KEY_PARAMS, f"has balance {search!r}, not a search record")
        candidates = search["candidates"]
        if not (isinstance(candidates, list) and candidates and all(isinstance(c, dict) for c in candidates)):
            self.fail(KEY_PARAMS, "has balance candidates that are not a list of {beta, gamma_scale, scores}")
        knobs = [(c.get("beta"), c.get("gamma_scale")) for c in candidates]
        for (beta, scale), candidate in zip(knobs, candidates):
            scores = candidate.get("scores")
            if not ((beta is None or finite(beta)) and finite(scale) and isinstance(scores, dict) and scores
                    and all(finite(value) for value in scores.values())):
                self.fail(KEY_PARAMS, f"has balance candidate beta={beta!r} gamma_scale={scale!r} without finite "
                                      "knobs and scores")
        chosen = search["chosen"]
        if not (isinstance(chosen, dict) and (chosen.get("beta"), chosen.get("gamma_scale")) in knobs):
            self.fail(KEY_PARAMS, f"has balance chosen {chosen!r}, which is none of its candidates")
