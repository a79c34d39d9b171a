"""A safetensors file read one tensor at a time, and the layout a writer must reproduce.

A merge reads each factor two or three times (check, score, export) but never needs all of them at once. Reading
a tensor's bytes from the file into a fresh buffer on each access keeps memory at one module's worth, where a
memory map would keep every page it ever touched resident (and counted) until it is unmapped. The bytes come from
the page cache after the first pass, so a repeated read costs a memcpy, not a disk access.

Import-light (torch and the standard library): the file format writer uses the same dtype table.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# safetensors dtype names, in the order its writer lays tensors out (largest first, then by name within a dtype)
DTYPE_NAMES = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.uint32: "U32",
    torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16",
    torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fn: "F8_E4M3", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
LAYOUT_RANK = {dtype: rank for rank, dtype in enumerate(DTYPE_NAMES)}
HEADER_LIMIT = 100 << 20  # safetensors' own bound on a header


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets
    end: int


class TensorFile:
    """The header of a safetensors file, and its tensors read on demand (each read is a new, writable tensor).

    Only opened after `safetensors.safe_open` accepted the file, so the header is known to be well formed.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(min(size, HEADER_LIMIT)))
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        base = 8 + size
        self.entries = {
            key: Entry(DTYPES[info["dtype"]], tuple(info["shape"]), base + info["data_offsets"][0],
                       base + info["data_offsets"][1])
            for key, info in header.items()
        }
        self._fd = os.open(self.path, os.O_RDONLY)  # kept open for the reads, closed with the object

    def __del__(self) -> None:
        if hasattr(self, "_fd"):
            os.close(self._fd)

    def keys(self):
        return self.entries.keys()

    def meta(self, key: str) -> torch.Tensor:
        """A stand-in with the tensor's shape and dtype and no data."""
        entry = self.entries[key]
        return torch.empty(entry.shape, dtype=entry.dtype, device="meta")

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        return self._bytes(entry.start, entry.end, key).view(entry.dtype).reshape(entry.shape)

    def _bytes(self, start: int, end: int, what: str) -> torch.Tensor:
        data = torch.empty(end - start, dtype=torch.uint8)
        view, done = memoryview(data.numpy()), 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], start + done)
            if not got:
                raise OSError(f"{self.path}: ends inside {what}")
            done += got
        return data

    def sha256(self, inspect: Callable[[str, torch.Tensor], None] | None = None) -> str:
        """The file's sha256 from one read from start to end; `inspect(key, tensor)` sees each tensor on the way."""
        digest, position = hashlib.sha256(), 0
        for key, entry in sorted(self.entries.items(), key=lambda item: item[1].start):
            digest.update(self._bytes(position, entry.start, "the header").numpy())
            data = self._bytes(entry.start, entry.end, f"tensor {key}")
            digest.update(data.numpy())
            if inspect is not None:
                inspect(key, data.view(entry.dtype).reshape(entry.shape))
            position = entry.end
        while chunk := os.pread(self._fd, 1 << 24, position):  # anything after the last tensor
            digest.update(chunk)
            position += len(chunk)
        return digest.hexdigest()
