"""The extension's Script as the WebUI loads it, for every host world: the extension's folder first on sys.path
while `scripts/lorasched.py` is imported by path (`modules.script_loading.load_module`), then one `Script()`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXTENSION = Path(__file__).resolve().parents[2] / "sd-webui-lorasched"


def load_script():
    """The Script instance; the host's `modules.scripts` and `modules.shared` must be importable (real or stubbed:
    a stub without the Script base class gets a bare one, which is all the extension's Script derives from it)."""
    scripts = sys.modules.get("modules.scripts")
    if scripts is not None and not hasattr(scripts, "Script"):
        scripts.Script = type("Script", (), {})
        scripts.AlwaysVisible = object()
    if str(EXTENSION) not in sys.path:
        sys.path.insert(0, str(EXTENSION))
    path = EXTENSION / "scripts" / "lorasched.py"
    spec = importlib.util.spec_from_file_location(path.name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Script()
