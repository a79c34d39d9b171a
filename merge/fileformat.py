"""The scheduled LoRA file: metadata schema, tensor hash, deterministic atomic streamed write, and reading it back.

Shared by the exporter and the replay hook so the two cannot drift apart. Import-light on purpose (torch,
safetensors, json): the replay hook imports it in deployments without the converter's extras.
See docs/FORMAT.md for the schema.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import FormatError
from .lora import ROLES
from .schedule import Schedule
from .tensorfile import DTYPE_NAMES, LAYOUT_RANK

NAMESPACE = "lorasched"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", FORMAT_VERSION)  # format 1: a subject/style pair, sources and phases by role name
KEY_VERSION = f"{NAMESPACE}.format_version"
KEY_METHOD = f"{NAMESPACE}.method"
KEY_PARAMS = f"{NAMESPACE}.params"
KEY_SOURCES = f"{NAMESPACE}.sources"
KEY_SCHEDULE = f"{NAMESPACE}.schedule"
KEY_MODULES = f"{NAMESPACE}.modules"
KEY_TENSOR_HASH = f"{NAMESPACE}.tensor_sha256"
KEY_TENSOR_FORMAT = f"{NAMESPACE}.tensor_format"  # `kohya` (also when absent) or `diffusers`
PEFT_TO_HOOK = ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight"))


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes of every tensor, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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


def _hook_name(key: str) -> str:
    """`<module>.lora_A.weight` -> `<module>.lora_down.weight`: the hook reads every format by the record key."""
    for peft, hook in PEFT_TO_HOOK:
        if key.endswith(peft):
            return key.removesuffix(peft) + hook
    return key


@dataclass(frozen=True)
class ScheduledFile:
    """What replay and inspect need from a file: its checked metadata, and the tensors when asked for."""

    path: str
    metadata: dict[str, str]
    method: str
    params: dict
    sources: list[dict]  # in file order: file, sha256, dtype, role, strength (format 1: the pair's two)
    modules: dict[str, dict]
    schedule: Schedule
    tensors: dict[str, torch.Tensor] | None = None  # named `<record key>.lora_down/up.weight` whatever the format

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(source["role"] for source in self.sources)


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


def is_scheduled(path: str | Path) -> bool:
    """Whether a safetensors file carries lorasched metadata (any format version)."""
    with safe_open(os.fspath(path), "pt") as handle:
        return KEY_VERSION in (handle.metadata() or {})


def read(path: str | Path, with_tensors: bool = False) -> ScheduledFile:
    """Parse and check a lorasched file against the whole schema; with tensors, also refuse one whose tensors do
    not match its records or whose tensor hash does not match (weights changed after export). Every problem is a
    one-line `FormatError` naming the file and the key."""
    try:
        with safe_open(os.fspath(path), "pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (OSError, SafetensorError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    version = metadata.get(KEY_VERSION)
    if version is None:
        raise FormatError(f"{path}: not a lorasched file (no {KEY_VERSION} in its metadata)")
    if version not in READABLE_VERSIONS:
        raise FormatError(f"{path}: lorasched format {version} is not supported (this lorasched reads "
                          f"{', '.join(READABLE_VERSIONS)})")
    check = _Checker(path, metadata, named=version == "1")
    if metadata.get(KEY_TENSOR_FORMAT, TENSOR_FORMATS[0]) not in TENSOR_FORMATS:
        check.fail(KEY_TENSOR_FORMAT, f"is {metadata[KEY_TENSOR_FORMAT]!r}, not one of {', '.join(TENSOR_FORMATS)}")
    method = check.method()
    sources = check.sources()
    scheduled = ScheduledFile(
        path=os.fspath(path),
        metadata=metadata,
        method=method,
        params=check.params(method, tuple(source["role"] for source in sources)),
        sources=sources,
        modules=check.modules(len(sources)),
        schedule=check.schedule(len(sources)),
    )
    check.consistent(scheduled)
    if metadata.get(KEY_TENSOR_FORMAT) == "diffusers":
        shapes = {_hook_name(key): shape for key, shape in shapes.items()}
    check.shapes(scheduled.modules, shapes)
    if not with_tensors:
        return scheduled
    try:
        tensors = load_file(os.fspath(path))
    except (OSError, SafetensorError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    if tensor_sha256(tensors) != metadata.get(KEY_TENSOR_HASH):
        raise FormatError(f"{path}: tensor hash does not match the schedule (weights changed after export)")
    if metadata.get(KEY_TENSOR_FORMAT) == "diffusers":
        tensors = {_hook_name(key): tensor for key, tensor in tensors.items()}
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise FormatError(f"{path}: tensor {key} is not finite floating point")
    return replace(scheduled, tensors=tensors)


METHOD_PARAMS = {"klora": ("alpha", "beta"), "est": ("alpha", "beta"), "direct": (),
                 "feature-kl": ("temperature",), "np-lora": ("mu",), "switch": ("period", "steps"),
                 "windows": ("subject_end", "style_start"), "blocks": ()}
NESTED_PARAMS = {  # what inspect shows of them
    "calibration": ("prompts", "seeds", "guidance", "size", "mean_agreement", "log"),
    "beta_source": ("similarity", "embedder", "prompt", "seed", "steps"),
    "balance": ("objective", "candidates", "chosen", "prompts", "seeds", "steps", "size", "clip", "dino", "log"),
}
SOURCE_NAMES = ("subject", "style")  # format 1's two sources, in order
TENSOR_FORMATS = ("kohya", "diffusers")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class _Checker:
    """The schema, checked key by key; the first problem raises with the key it is in."""

    def __init__(self, path, metadata: dict[str, str], named: bool) -> None:
        self.path, self.metadata, self.named = path, metadata, named

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

    def sources(self) -> list[dict]:
        """The sources in file order; format 1's {subject, style} object becomes that list."""
        if self.named:
            sources = self.json(KEY_SOURCES, dict)
            for role in SOURCE_NAMES:
                if not isinstance(sources.get(role), dict):
                    self.fail(KEY_SOURCES, f"has no {role} with a file name and sha256")
            sources = [{**sources[role], "role": role} for role in SOURCE_NAMES]
        else:
            sources = self.json(KEY_SOURCES, list)
        files = set()
        for index, info in enumerate(sources):
            if not isinstance(info, dict) or not isinstance(info.get("file"), str) or \
                    not isinstance(info.get("sha256"), str) or info.get("role") not in ROLES:
                self.fail(KEY_SOURCES, f"has source {index} without a file name, sha256 and role "
                                       f"({', '.join(ROLES)})")
            if not _finite(info.get("strength", 1.0)):
                self.fail(KEY_SOURCES, f"has source {index} with strength {info['strength']!r}, not a finite number")
            files.add(info["sha256"])
        roles = [info["role"] for info in sources]
        if "subject" not in roles or "style" not in roles or (len(files) < len(sources) and not self.named):
            self.fail(KEY_SOURCES, "needs at least one subject and one style, each file once")
        return sources

    def modules(self, sources: int) -> dict[str, dict]:
        modules = self.json(KEY_MODULES, dict)
        if not modules:
            self.fail(KEY_MODULES, "lists no module")
        for name, record in modules.items():
            if not isinstance(record, dict) or not isinstance(record.get("key"), str):
                self.fail(KEY_MODULES, f"has no tensor key for {name}")
            ranks, static = record.get("ranks"), record.get("static")
            if not (isinstance(ranks, list) and len(ranks) == sources and
                    all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks) and sum(ranks)):
                self.fail(KEY_MODULES, f"has ranks {ranks!r} for {name}, not {sources} non-negative integers")
            if not (isinstance(static, list) and len(static) == sources and
                    all(_finite(c) and 0 <= c <= 1 for c in static)):
                self.fail(KEY_MODULES, f"has static weights {static!r} for {name}, not {sources} numbers in [0, 1]")
            scores = record.get("scores")
            if scores is not None and not (isinstance(scores, list) and len(scores) == sources and
                                           all(score is None or _finite(score) for score in scores)):
                self.fail(KEY_MODULES, f"has scores {scores!r} for {name}, not {sources} numbers or nulls")
            if any(rank and not weight for rank, weight in zip(ranks, static)):
                self.fail(KEY_MODULES, f"gives {name} a source with a rank but a static weight of 0")
        return modules

    def schedule(self, sources: int) -> Schedule:
        data = self.json(KEY_SCHEDULE, dict)
        try:
            return Schedule.from_data(data, sources, self.named)
        except ValueError as exc:
            self.fail(KEY_SCHEDULE, str(exc))

    def consistent(self, scheduled: ScheduledFile) -> None:
        """Every scheduled layer has a record whose ranks carry the sources its phases use."""
        layers, modules = scheduled.schedule.layers, scheduled.modules
        if set(layers) != set(modules):
            name = sorted(set(layers) ^ set(modules))[0]
            self.fail(KEY_SCHEDULE, f"and {KEY_MODULES} disagree on the layers ({name} is in only one)")
        for name, phases in layers.items():
            ranks = modules[name]["ranks"]
            for _, selection in phases:
                for index in selection:
                    if not ranks[index]:
                        source = scheduled.sources[index]
                        self.fail(KEY_SCHEDULE, f"makes {name} use the {source['role']} LoRA {source['file']} "
                                                f"(source {index}), whose factors it does not carry")

    def shapes(self, modules: dict[str, dict], shapes: dict[str, tuple[int, ...]]) -> None:
        """Each module's factors exist, as matrices (or conv kernels) of the recorded total rank."""
        for name, record in modules.items():
            key, rank = record["key"], sum(record["ranks"])
            down, up = shapes.get(f"{key}.lora_down.weight"), shapes.get(f"{key}.lora_up.weight")
            if down is None or up is None:
                raise FormatError(f"{self.path}: no factors for {name} (tensors {key}.lora_down/up.weight)")
            if len(down) < 2 or len(up) < 2 or down[0] != rank or up[1] != rank:
                raise FormatError(f"{self.path}: factors of {name} have shapes {down} and {up}, not rank {rank}")
