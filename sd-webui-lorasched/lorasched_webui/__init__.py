"""sd-webui-lorasched: replay a lorasched file's per-layer, per-step schedule in A1111, Forge and reForge.

Each WebUI keeps its own LoRA machinery, so each has its own module here (`a1111`, `forge`, `reforge`) with the
same entry points the Script calls: `setup()` once when it loads (`unload()` when the WebUI unloads scripts),
`process_batch(p)` after `<lora:…>` has loaded the prompt's files, and `process_before_every_sampling(p)` before
every sampling run (the hires pass too), which returns the files it replays. `host()` picks the module of the
WebUI it runs in, once. `runs.py` places a model evaluation in the schedule its run was cut from (shared by the
three), `library.py` says what the accordion and the infotext show. The reader (`schema.py`) and the
ComfyUI-patcher replay (`patching.py`) are verbatim copies of lorasched's own, made by `make packs`.
"""

from __future__ import annotations

import functools
import importlib
from importlib.util import find_spec
from types import ModuleType


def _running(package: str) -> bool:
    try:
        return find_spec(package) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def host() -> ModuleType:
    """Forge has its own `backend` patcher, reForge ComfyUI's `ldm_patched`; neither is A1111 1.10."""
    if _running("backend.patcher"):
        name = "forge"
    elif _running("ldm_patched"):
        name = "reforge"
    else:
        name = "a1111"
    return importlib.import_module(f"{__name__}.{name}")
