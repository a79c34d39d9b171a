"""What the fast paths must not change: K-LoRA scores equal, bit for bit, those of a float64 dense ΔW (whatever the
tiling, dtype, rank or ties), the streamed writer writes the bytes `save_file` writes for the same tensors and
metadata, and a merge holds one module's factors at a time."""

from __future__ import annotations

import json
import math
import struct
import weakref

import pytest
import torch
from lorasched.convert import merge
from lorasched.merge import fileformat
from lorasched.merge.lora import LoraModule
from lorasched.merge.rules import klora
from safetensors.torch import save_file


def dense_score(module: LoraModule, k: int) -> tuple[float, float]:
    """(top-K score, Σ|ΔW|) from a float64 dense ΔW built by rank-1 updates (exact products, rank order), its
    K largest |entries| added exactly."""
    up, down = module.up.flatten(1).double(), module.down.flatten(1).double()
    delta = torch.zeros(up.shape[0], down.shape[1], dtype=torch.float64)
    for j in range(up.shape[1]):
        delta += torch.outer(up[:, j], down[j])
    values = (delta * module.scale).abs().flatten()
    return math.fsum(sorted(values.tolist(), reverse=True)[:k]), float(values.sum())


def random_module(shape, rank, dtype, seed, conv=False, spread=1.0) -> LoraModule:
    """Factors with per-row magnitudes spread over `spread` decades, so the top entries cluster in a few rows."""
    generator = torch.Generator().manual_seed(seed)
    rows = 10 ** (spread * torch.rand(shape[0], 1, generator=generator))
    up = torch.randn(shape[0], rank, generator=generator) * rows * 0.02
    down = torch.randn(rank, shape[1], generator=generator) * 0.05
    if conv:
        down, up = down.view(rank, shape[1] // 9, 3, 3), up.view(shape[0], rank, 1, 1)
    return LoraModule(down.to(dtype), up.to(dtype), 0.37)


CASES = [  # (out, in), rank, K, dtype, conv
    ((640, 640), 64, 64 * 64, torch.float16, False),
    ((2560, 320), 16, 16 * 4, torch.bfloat16, False),
    ((700, 900), 8, 64, torch.float32, False),
    ((320, 64 * 9), 4, 16, torch.float16, True),
    ((500, 300), 3, 9, torch.float64, False),
    ((40, 30), 4, 5000, torch.float32, False),  # K above the entry count: every entry counts
    ((333, 257), 1, 1, torch.float16, False),
]


@pytest.mark.parametrize("tile", [1 << 21, 1 << 13, 300])
@pytest.mark.parametrize("shape, rank, k, dtype, conv", CASES)
def test_topk_score_is_bit_identical_to_the_float64_dense_score(monkeypatch, shape, rank, k, dtype, conv, tile):
    monkeypatch.setitem(klora.TILE_ENTRIES, "cpu", tile)
    module = random_module(shape, rank, dtype, seed=rank + len(shape), conv=conv, spread=2.0)
    score, l1 = klora.topk_and_l1(module, k)
    expected, dense_l1 = dense_score(module, k)
    assert score == expected
    assert l1 == pytest.approx(dense_l1, rel=1e-6)


def test_ties_and_exact_cancellations_score_as_the_dense_reference():
    """Integer factors: many equal |entries| at the K-th place, and entries that cancel to exactly zero."""
    generator = torch.Generator().manual_seed(3)
    module = LoraModule(torch.randint(-2, 3, (6, 500), generator=generator).half(),
                        torch.randint(-2, 3, (700, 6), generator=generator).half(), 1.0)
    for k in (1, 36, 1000, 10_000):
        assert klora.topk_and_l1(module, k)[0] == dense_score(module, k)[0], k


def test_a_float32_near_tie_is_decided_by_the_exact_entries():
    """Two entries that float32 cannot order: the exact sums differ by far less than a float32 ulp."""
    up = torch.tensor([[1.0, 2.0**-30], [1.0, -(2.0**-30)]], dtype=torch.float64)
    down = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    module = LoraModule(down, up, 1.0)
    assert klora.topk_and_l1(module, 1)[0] == 1.0 + 2.0**-30 == dense_score(module, 1)[0]


def test_the_error_bound_covers_the_float32_entries():
    module = random_module((640, 640), 64, torch.float16, seed=1, spread=3.0)
    up, down = module.up.float(), module.down.float()
    bound = klora.error_bound(up, down, torch.float16)
    exact = up.double() @ down.double()
    assert float(((up @ down).double() - exact).abs().max()) <= bound
    assert bound < 1e-4 * float(exact.abs().max()), "tight enough to keep few candidates"


def sorted_save_file(tensors, metadata, path) -> bytes:
    """`save_file`, then its header re-serialised with sorted metadata keys: the file as written in one piece."""
    save_file(tensors, path, metadata=metadata)
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + size:]


@pytest.mark.parametrize("dtypes", [(torch.float16,), (torch.bfloat16,), (torch.float32, torch.float16, torch.bfloat16,
                                                                          torch.float64, torch.int64)])
def test_the_streamed_file_is_byte_identical_to_one_written_in_one_piece(tmp_path, dtypes):
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(12):
        shape = (1 + i % 3, 5 + i) if i % 4 else (3, 2, 1, 1)
        dtype = dtypes[i % len(dtypes)]
        values = torch.randn(shape, generator=generator) * 100
        tensors[f"lora_unet_m{i % 5}_{i}.lora_{'down' if i % 2 else 'up'}.weight"] = values.to(dtype)
    metadata = {"z": "last", "a": "first", "ß": "ünïcode", "lorasched.method": "direct"}
    path = tmp_path / "streamed.safetensors"
    fileformat.write(path, tensors, metadata)
    full = {**metadata, fileformat.KEY_VERSION: fileformat.FORMAT_VERSION,
            fileformat.KEY_TENSOR_HASH: fileformat.tensor_sha256(tensors)}
    assert path.read_bytes() == sorted_save_file(tensors, full, tmp_path / "whole.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["streamed.safetensors", "whole.safetensors"]


def test_a_merge_holds_one_module_of_factors_at_a_time(tiny_base, kohya_pair, tmp_path, monkeypatch):
    """Every factor the scorer and the exporter use is read from its file when asked for, and each output tensor is
    made right before it is written: at most one module's tensors are alive at once."""
    from lorasched.merge.lora_io import StoredFactor

    alive, peak = set(), [0]
    load = StoredFactor.load

    def counted(self):
        tensor = load(self)
        alive.add(id(tensor))
        peak[0] = max(peak[0], len(alive))
        weakref.finalize(tensor, alive.discard, id(tensor))
        return tensor

    monkeypatch.setattr(StoredFactor, "load", counted)
    out = tmp_path / "merged.safetensors"
    merge(str(tiny_base), *map(str, kohya_pair), str(out), "klora")
    assert fileformat.read(out, with_tensors=True).modules
    assert 0 < peak[0] <= 4, peak[0]  # down and up of both sources of one module
