"""Writing the scheduled LoRA file (metadata, deterministic atomic streamed write) and reading it as the converter does.

The schema and the reader every consumer shares are `schema.py`; this module adds what only lorasched itself
checks: the method and its params. Import-light on purpose (torch, safetensors, json). docs/FORMAT.md is the schema.
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

from .errors import FormatError
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


METHOD_PARAMS = {"klora": ("alpha", "beta"), "est": ("alpha", "beta"), "direct": (),
                 "feature-kl": ("temperature",), "np-lora": ("mu",), "switch": ("period", "steps"),
                 "windows": ("subject_end", "style_start"), "blocks": ()}
NESTED_PARAMS = {  # what inspect shows of them
    "calibration": ("prompts", "seeds", "guidance", "size", "mean_agreement", "log"),
    "beta_source": ("similarity", "embedder", "prompt", "seed", "steps"),
    "balance": ("objective", "candidates", "chosen", "prompts", "seeds", "steps", "size", "clip", "dino", "log"),
}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


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

    def method(self) -> str:
        method = self.metadata.get(KEY_METHOD)
        if method not in METHOD_PARAMS:
            self.fail(KEY_METHOD, f"is {method!r}, not one of {', '.join(METHOD_PARAMS)}")
        return method

    def params(self, method: str, roles: tuple[str, ...]) -> dict:
        params = self.json(KEY_PARAMS, dict)
        for name in METHOD_PARAMS[method]:
            if not _finite(params.get(name)):
                self.fail(KEY_PARAMS, f"needs a finite number {name!r} for {method} (has {params.get(name)!r})")
        if method in ("klora", "est"):
            self.gammas(params, roles)
        if method == "feature-kl" and not _finite(params.get("gamma")) and not (
                isinstance(params.get("balances"), list) and len(params["balances"]) == len(roles) and
                all(b is None or (_finite(b) and b > 0) for b in params["balances"])):
            self.fail(KEY_PARAMS, "needs a finite 'gamma' (a pair) or one positive 'balances' entry per source for "
                                  "feature-kl")
        self.method_params(method, params, roles)
        if "steps" in params and not (isinstance(params["steps"], int) and params["steps"] >= 1):
            self.fail(KEY_PARAMS, f"has steps {params['steps']!r}, not a positive integer")
        if "gamma_scale" in params and not (_finite(params["gamma_scale"]) and params["gamma_scale"] > 0):
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
            if not ((beta is None or _finite(beta)) and _finite(scale) and isinstance(scores, dict) and scores
                    and all(_finite(value) for value in scores.values())):
                self.fail(KEY_PARAMS, f"has balance candidate beta={beta!r} gamma_scale={scale!r} without finite "
                                      "knobs and scores")
        chosen = search["chosen"]
        if not (isinstance(chosen, dict) and (chosen.get("beta"), chosen.get("gamma_scale")) in knobs):
            self.fail(KEY_PARAMS, f"has balance chosen {chosen!r}, which is none of its candidates")

    def gammas(self, params: dict, roles: tuple[str, ...]) -> None:
        """A switch's balance: one finite `gamma` (a pair), or a `gammas` entry for every subject/style pairing and
        per source `norms`."""
        if "gammas" not in params:
            if not _finite(params.get("gamma")):
                self.fail(KEY_PARAMS, f"needs a finite number 'gamma' (has {params.get('gamma')!r})")
            return
        gammas, norms = params["gammas"], params.get("norms")
        pairings = {(i, j) for i, a in enumerate(roles) for j, b in enumerate(roles) if (a, b) == ("subject", "style")}
        if not (isinstance(gammas, list) and all(isinstance(g, list) and len(g) == 3 and _finite(g[2]) for g in gammas)
                and {tuple(g[:2]) for g in gammas} == pairings and len(gammas) == len(pairings)
                and isinstance(norms, list) and len(norms) == len(roles) and all(_finite(n) for n in norms)):
            self.fail(KEY_PARAMS, "has gammas that are not one [subject, style, γ] per pairing of its sources, with "
                                  "one finite norm per source")

    def method_params(self, method: str, params: dict, roles: tuple[str, ...]) -> None:
        """The scheduled methods' own parameters, as their rules read them back."""
        if method == "switch":
            order, switched = params.get("order"), [i for i, role in enumerate(roles) if role != "static"]
            if not (isinstance(order, list) and sorted(order) == switched and _count(params["period"])):
                self.fail(KEY_PARAMS, f"has switch order {order!r} and period {params['period']!r}, not every "
                                      "subject and style once and a positive whole number of steps")
        if method == "windows" and not all(0 <= params[key] <= 1 for key in ("subject_end", "style_start")):
            self.fail(KEY_PARAMS, "has windows outside [0, 1]")
        if method == "np-lora" and not (params["mu"] >= 0 and (params.get("directions") is None or
                                                               _count(params["directions"]))):
            self.fail(KEY_PARAMS, f"has mu {params['mu']!r} or directions {params.get('directions')!r} out of range")
