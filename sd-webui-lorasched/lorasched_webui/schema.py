"""The scheduled LoRA file as typed records, and the one reader every consumer checks it with.

The converter (`merge.fileformat` checks the method's own params on top), the diffusers hook (`attach`), the
ComfyUI node and the WebUI extension all read files here, so a file one of them accepts the others accept too.
Standard library, torch and safetensors only: the node pack and the extension must install alone, so `make packs`
copies this file verbatim into `comfyui-lorasched/schema.py` and `sd-webui-lorasched/lorasched_webui/schema.py`,
and a test checks the copies equal it. Edit this file, never a copy. docs/FORMAT.md is the schema in prose.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file


class LoraschedError(Exception):
    """A problem with the user's input, worded for the user: it names the file and what is wrong."""


class FormatError(LoraschedError, ValueError):
    """The file is not a lorasched file, its metadata breaks the schema, or its weights no longer match it."""


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
TENSOR_FORMATS = ("kohya", "diffusers")
PEFT_TO_HOOK = ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight"))
ROLES = ("subject", "style", "static")
PAIR_ROLES = ROLES[:2]  # format 1's two sources, in order
PAIR_SELECTIONS = {"subject": (0,), "style": (1,), "both": (0, 1)}  # format 1's phase names
AXIS_PROGRESS = "progress"
AXIS_NOISE = "noise"
AXES = (AXIS_PROGRESS, AXIS_NOISE)
DENOISERS = ("unet", "transformer")  # the pipeline components that run once per denoising step
LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", ".alpha", "lora.down", "lora.up", "hada_", "lokr_")

Selection = tuple[int, ...]  # the indices of the sources active, ascending; () is no LoRA


class Phase(NamedTuple):
    """From `start` on the schedule's time axis until the next phase starts, the layer runs `selection`."""

    start: float
    selection: Selection


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of every tensor's `name|dtype|shape|` then its bytes, in name order (docs/FORMAT.md, Integrity)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Source:
    """One input LoRA of the file: its file name, sha256, role (subject, style or static) and strength."""

    file: str
    sha256: str
    role: str
    strength: float = 1.0
    dtype: str | None = None

    def describe(self, index: int) -> str:
        return f"the {self.role} LoRA {self.file} (source {index})"


@dataclass(frozen=True)
class ModuleRecord:
    """One adapted module: its tensor key, each source's rank block and static weight c_k, and its scores."""

    key: str
    ranks: tuple[int, ...]
    static: tuple[float, ...]
    scores: tuple[float | None, ...] | None = None

    def adapted_by(self) -> Selection:
        return tuple(index for index, rank in enumerate(self.ranks) if rank)


@dataclass(frozen=True)
class Schedule:
    """Per layer, which sources are active as a function of time in [0, 1] on `axis` (see schedule.py)."""

    layers: dict[str, tuple[Phase, ...]]
    axis: str = AXIS_PROGRESS
    agreement: dict[str, tuple[float, ...]] | None = None  # calibrated: per layer, per bin, share of the votes
    bins: tuple[float, ...] | None = None  # calibrated: the start of each time bin

    def active(self, layer: str, time: float) -> Selection:
        return selection_at(self.layers[layer], time)

    def static_weights(self, layer: str, sources: int) -> tuple[float, ...]:
        """Fraction of progress each of the `sources` is active: what a plain loader should apply as a fixed mix."""
        phases = self.layers[layer]
        ends = [start for start, _ in phases[1:]] + [1.0]
        weights = [0.0] * sources
        for (start, selection), end in zip(phases, ends):
            for index in selection:
                weights[index] += end - start
        return tuple(weights)

    def to_json(self) -> str:
        data = {"axis": self.axis,
                "layers": {name: [[start, list(selection)] for start, selection in phases]
                           for name, phases in self.layers.items()}}
        if self.agreement is not None:
            data["agreement"] = {name: [round(a, 4) for a in shares] for name, shares in self.agreement.items()}
            data["bins"] = list(self.bins)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, sources: int) -> Schedule:
        return cls.from_data(json.loads(text), sources)

    @classmethod
    def from_data(cls, data: dict, sources: int, named: bool = False) -> Schedule:
        """A schedule over `sources` sources from its JSON form (`named`: format 1's subject/style/both); a
        ValueError names the first thing that breaks the format."""
        axis, layers = data.get("axis"), data.get("layers")
        if axis not in AXES:
            raise ValueError(f"has axis {axis!r}, not one of {', '.join(AXES)}")
        if not isinstance(layers, dict) or not layers:
            raise ValueError("lists no layers")
        parsed = {name: _phases(name, phases, sources, named) for name, phases in layers.items()}
        agreement, bins = data.get("agreement"), data.get("bins")
        if agreement is None:
            return cls(layers=parsed, axis=axis)
        if not (isinstance(bins, list) and bins and all(_finite(b) for b in bins) and
                isinstance(agreement, dict) and all(isinstance(a, list) and all(_finite(x) for x in a)
                                                    for a in agreement.values())):
            raise ValueError("has agreement without numeric bins and per-layer shares")
        for name, phases in parsed.items():
            if any(start not in bins for start, _ in phases) or len(agreement.get(name, ())) not in (0, len(bins)):
                raise ValueError(f"has phases or agreement for {name} that do not fall on its bins")
        return cls(layers=parsed, axis=axis, agreement={name: tuple(a) for name, a in agreement.items()},
                   bins=tuple(bins))


def selection_at(phases: tuple[Phase, ...], time: float) -> Selection:
    """The sources of the phase running at `time` (a phase runs from its start until the next one starts)."""
    return phases[bisect.bisect_right([start for start, _ in phases], time) - 1][1]


def is_denoiser(name: str) -> bool:
    """Whether a module runs once per denoising step (the denoiser's), not once per prompt (a text encoder's)."""
    return name.split(".", 1)[0] in DENOISERS


@dataclass(frozen=True)
class Layer:
    """What a replay needs of one module: its key, phases, and per source the factors (ΔW_k = up @ down, the
    source's static weight divided out)."""

    name: str  # diffusers pipeline path, component first: `unet.down_blocks.0.attentions.0…attn1.to_q`
    key: str  # the file's name for it: kohya `lora_unet_…` or diffusers `transformer.…`
    phases: tuple[Phase, ...]
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    @property
    def is_denoiser(self) -> bool:
        return is_denoiser(self.name)

    @property
    def switches(self) -> bool:
        return len(self.phases) > 1

    def selection_at(self, time: float) -> Selection:
        return selection_at(self.phases, time)


@dataclass(frozen=True)
class ScheduledFile:
    """A checked file: its metadata, method and params, sources, module records and schedule; the tensors (named
    `<record key>.lora_down/up.weight` whatever the format) when read with them."""

    path: str
    metadata: dict[str, str]
    method: str
    params: dict
    sources: tuple[Source, ...]
    modules: dict[str, ModuleRecord]
    schedule: Schedule
    tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def version(self) -> str:
        return self.metadata[KEY_VERSION]

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(source.role for source in self.sources)

    @property
    def axis(self) -> str:
        return self.schedule.axis

    def factors(self, name: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Undo the export's rank concatenation of one module: per source index, (down, up) in float32 with the
        static weight divided out (the file stores down = [c_0·A_0 ; c_1·A_1 ; …], up = [B_0 | B_1 | …])."""
        record = self.modules[name]
        down = self.tensors[f"{record.key}.lora_down.weight"]
        up = self.tensors[f"{record.key}.lora_up.weight"]
        offset, parts = 0, {}
        for source, (rank, weight) in enumerate(zip(record.ranks, record.static)):
            if rank:
                parts[source] = (down[offset : offset + rank].float() / weight, up[:, offset : offset + rank].float())
                offset += rank
        return parts

    def layers(self) -> dict[str, Layer]:
        """Every scheduled module as a `Layer` (needs the tensors)."""
        return {name: Layer(name, record.key, self.schedule.layers[name], self.factors(name))
                for name, record in self.modules.items()}


def is_scheduled(path: str | os.PathLike) -> bool:
    """Whether a safetensors file carries lorasched metadata (any format version): how hosts claim a file."""
    try:
        with safe_open(os.fspath(path), "pt") as handle:
            return KEY_VERSION in (handle.metadata() or {})
    except (OSError, SafetensorError):
        return False


def read(path: str | os.PathLike, with_tensors: bool = False) -> ScheduledFile:
    """Parse and check a lorasched file against the schema (method params aside: `merge.fileformat` checks those);
    with tensors, also the tensor hash and finiteness. Every problem is one `FormatError` line naming the file."""
    path = os.fspath(path)
    try:
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (OSError, SafetensorError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    version = metadata.get(KEY_VERSION)
    if version is None:
        plain = any(marker in key for key in shapes for marker in LORA_MARKERS)
        raise FormatError(f"{path}: {'a plain LoRA, ' if plain else ''}not a lorasched file (no {KEY_VERSION} in its "
                          "metadata)")
    if version not in READABLE_VERSIONS:
        raise FormatError(f"{path}: lorasched format {version} is not supported (this reader reads "
                          f"{', '.join(READABLE_VERSIONS)}); update lorasched")
    check = _Checker(path, metadata, named=version == "1")
    tensor_format = metadata.get(KEY_TENSOR_FORMAT, TENSOR_FORMATS[0])
    if tensor_format not in TENSOR_FORMATS:
        check.fail(KEY_TENSOR_FORMAT, f"is {tensor_format!r}, not one of {', '.join(TENSOR_FORMATS)}")
    sources = check.sources()
    scheduled = ScheduledFile(
        path=path,
        metadata=metadata,
        method=check.method(),
        params=check.json(KEY_PARAMS, dict),
        sources=sources,
        modules=check.modules(len(sources)),
        schedule=check.schedule(len(sources)),
    )
    check.consistent(scheduled)
    if tensor_format == "diffusers":
        shapes = {_hook_name(key): shape for key, shape in shapes.items()}
    check.shapes(scheduled.modules, shapes)
    if not with_tensors:
        return scheduled
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    if tensor_sha256(tensors) != metadata.get(KEY_TENSOR_HASH):
        raise FormatError(f"{path}: tensor hash does not match the schedule (weights changed after export: re-saved, "
                          "pruned or re-quantised); export the file again with lorasched")
    if tensor_format == "diffusers":
        tensors = {_hook_name(key): tensor for key, tensor in tensors.items()}
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise FormatError(f"{path}: tensor {key} is not finite floating point")
    return replace(scheduled, tensors=tensors)


def _hook_name(key: str) -> str:
    """`<module>.lora_A.weight` -> `<module>.lora_down.weight`: readers find every format's factors by record key."""
    for peft, hook in PEFT_TO_HOOK:
        if key.endswith(peft):
            return key.removesuffix(peft) + hook
    return key


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _selection(value, sources: int, named: bool) -> Selection | None:
    if named:
        return PAIR_SELECTIONS.get(value) if isinstance(value, str) else None
    if not (isinstance(value, list) and all(_index(i) for i in value)):
        return None
    selection = tuple(value)
    ok = list(selection) == sorted(set(selection)) and all(0 <= i < sources for i in selection)
    return selection if ok else None


def _phases(name: str, phases, sources: int, named: bool) -> tuple[Phase, ...]:
    """One layer's phases, checked: [[start, selection], …], starts rising from 0 within [0, 1]."""
    shape = "subject|style|both" if named else f"[source index < {sources}, …] ascending"
    if not isinstance(phases, list) or not phases or not all(
            isinstance(p, list) and len(p) == 2 and _finite(p[0]) and _selection(p[1], sources, named) is not None
            for p in phases):
        raise ValueError(f"has phases {str(phases)[:80]} for {name}, not [[start, {shape}], …]")
    starts = [float(start) for start, _ in phases]
    if starts[0] != 0.0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] > 1.0:
        raise ValueError(f"has phase starts {starts} for {name}, not rising from 0 within [0, 1]")
    return tuple(Phase(start, _selection(value, sources, named)) for start, (_, value) in zip(starts, phases))


class _Checker:
    """The schema, checked key by key; the first problem raises with the key it is in."""

    def __init__(self, path: str, metadata: dict[str, str], named: bool) -> None:
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
        if not isinstance(method, str) or not method:
            self.fail(KEY_METHOD, "is missing")
        return method

    def sources(self) -> tuple[Source, ...]:
        """The sources in file order; format 1's {subject, style} object becomes that list."""
        if self.named:
            named = self.json(KEY_SOURCES, dict)
            for role in PAIR_ROLES:
                if not isinstance(named.get(role), dict):
                    self.fail(KEY_SOURCES, f"has no {role} with a file name and sha256")
            raw = [{**named[role], "role": role} for role in PAIR_ROLES]
        else:
            raw = self.json(KEY_SOURCES, list)
        for index, info in enumerate(raw):
            if not isinstance(info, dict) or not isinstance(info.get("file"), str) or \
                    not isinstance(info.get("sha256"), str) or info.get("role") not in ROLES:
                self.fail(KEY_SOURCES, f"has source {index} without a file name, sha256 and role "
                                       f"({', '.join(ROLES)})")
            if not _finite(info.get("strength", 1.0)):
                self.fail(KEY_SOURCES, f"has source {index} with strength {info['strength']!r}, not a finite number")
        roles = [info["role"] for info in raw]
        unique = len({info["sha256"] for info in raw}) == len(raw)
        if "subject" not in roles or "style" not in roles or (not unique and not self.named):
            self.fail(KEY_SOURCES, "needs at least one subject and one style, each file once")
        return tuple(Source(info["file"], info["sha256"], info["role"], float(info.get("strength", 1.0)),
                            info.get("dtype")) for info in raw)

    def modules(self, sources: int) -> dict[str, ModuleRecord]:
        modules = self.json(KEY_MODULES, dict)
        if not modules:
            self.fail(KEY_MODULES, "lists no module")
        records = {}
        for name, record in modules.items():
            if not isinstance(record, dict) or not isinstance(record.get("key"), str):
                self.fail(KEY_MODULES, f"has no tensor key for {name}")
            ranks, static = record.get("ranks"), record.get("static")
            if not (isinstance(ranks, list) and len(ranks) == sources and
                    all(_index(r) and r >= 0 for r in ranks) and sum(ranks)):
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
            records[name] = ModuleRecord(record["key"], tuple(ranks), tuple(static),
                                         None if scores is None else tuple(scores))
        return records

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
            ranks = modules[name].ranks
            for _, selection in phases:
                for index in selection:
                    if not ranks[index]:
                        source = scheduled.sources[index]
                        self.fail(KEY_SCHEDULE, f"makes {name} use {source.describe(index)}, whose factors it does "
                                                "not carry")

    def shapes(self, modules: dict[str, ModuleRecord], shapes: dict[str, tuple[int, ...]]) -> None:
        """Each module's factors exist, as matrices (or conv kernels) of the recorded total rank."""
        for name, record in modules.items():
            key, rank = record.key, sum(record.ranks)
            down, up = shapes.get(f"{key}.lora_down.weight"), shapes.get(f"{key}.lora_up.weight")
            if down is None or up is None:
                raise FormatError(f"{self.path}: no factors for {name} (tensors {key}.lora_down/up.weight)")
            if len(down) < 2 or len(up) < 2 or down[0] != rank or up[1] != rank:
                raise FormatError(f"{self.path}: factors of {name} have shapes {down} and {up}, not rank {rank}")
