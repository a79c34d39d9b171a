"""What the accordion and the infotext say about lorasched files: method, sources, how many layers switch.

From the header alone (`schema.read` without tensors), cached per file version, so listing a LoRA folder costs a
header read per file.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from .schema import FormatError, is_denoiser, is_scheduled, read


@functools.lru_cache(maxsize=256)
def _summary(path: str, mtime: float) -> str:
    try:
        scheduled = read(path)
    except FormatError as exc:
        return f"cannot be replayed: {str(exc).removeprefix(path + ': ')}"
    layers = scheduled.schedule.layers
    denoiser = [name for name in layers if is_denoiser(name)]
    switching = sum(len(layers[name]) > 1 for name in denoiser)
    roles = ", ".join(f"{source.role} {source.file}" for source in scheduled.sources)
    return f"{scheduled.method}, {switching} of {len(denoiser)} denoiser layers switch; {roles}"


def warn(message: str) -> None:
    """One console line, the same prefix in every host."""
    print(f"[lorasched] {message}", flush=True)


def summary(path: str) -> str:
    """One line about a lorasched file."""
    return _summary(path, os.path.getmtime(path))


def infotext(paths: list[str]) -> str:
    """The generation parameter `lorasched`: each replayed file and how many of its layers switch."""
    return "; ".join(f"{Path(path).stem} ({summary(path).split('; ')[0]})" for path in paths)


def folder_listing(folder: str | None) -> str:
    """Markdown: the lorasched files in the LoRA folder (recursively), each with its summary."""
    if not folder or not os.path.isdir(folder):
        return "No LoRA folder found."
    found = sorted(path for path in Path(folder).rglob("*.safetensors") if is_scheduled(path))
    if not found:
        return (f"No lorasched files in `{folder}`. Files written by `lorasched merge` replay here when the prompt "
                "names them as `<lora:NAME:STRENGTH>`.")
    return "\n".join(f"- **{path.stem}**: {summary(str(path))}" for path in found)
