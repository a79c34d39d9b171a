"""lorasched files broken in one way each, as every host test hands them to its WebUI: `rewritten` makes one,
`broken` the set a host must report in one console line (the problem named) and generate without."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lorasched.merge.schema import KEY_MODULES, KEY_TENSOR_HASH, KEY_VERSION, tensor_sha256
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def rewritten(source: Path, output: Path, *, plain: bool = False, tamper: bool = False, widen: int = 0,
              architecture: str | None = None, version: str | None = None) -> Path:
    """A changed copy of a lorasched file: `plain` without lorasched metadata; `tamper` one tensor changed (hash
    kept); `widen` every factor's input wider (a model of another size); `architecture` the UNet keys renamed as
    that architecture's (a FLUX-like block layout A1111's SD1 model lacks); `version` another format version. All
    but `tamper` re-hash the tensors, so only the named problem is left."""
    tensors = load_file(source)
    with safe_open(source, "pt") as handle:
        metadata = dict(handle.metadata())
    if plain:
        metadata = {key: value for key, value in metadata.items() if not key.startswith("lorasched.")}
    if widen:
        tensors = {key: torch.cat([value, value[:, :widen]], 1) if "lora_down" in key else value
                   for key, value in tensors.items()}
    if architecture:
        records = json.loads(metadata[KEY_MODULES])
        renamed = {}
        for index, record in enumerate(records.values()):
            if record["key"].startswith("lora_unet_"):
                renamed[record["key"]] = record["key"] = f"lora_unet_double_blocks_{index}_img_attn_qkv"
        tensors = {renamed.get(key.split(".", 1)[0], key.split(".", 1)[0]) + "." + key.split(".", 1)[1]: value
                   for key, value in tensors.items()}
        metadata[KEY_MODULES] = json.dumps(records)
        metadata["ss_base_model_version"] = architecture
    if version:
        metadata[KEY_VERSION] = version
    if not plain:
        metadata[KEY_TENSOR_HASH] = tensor_sha256(tensors)
    if tamper:
        first = sorted(tensors)[0]
        tensors[first] = tensors[first] * 1.01
    save_file(tensors, output, metadata)
    return output


def broken(good: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Case -> (a copy of `good` in `folder` broken that way, what the console line must say)."""
    return {
        "tampered": (rewritten(good, folder / "tampered.safetensors", tamper=True), "tensor hash does not match"),
        "other size": (rewritten(good, folder / "wider.safetensors", widen=8), "model of another size"),
        "other architecture": (rewritten(good, folder / "flux.safetensors", architecture="flux1"),
                               "have no weight in this model"),
        "format 3": (rewritten(good, folder / "future.safetensors", version="3"), "format 3 is not supported"),
    }
