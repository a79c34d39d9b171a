"""lorasched: fuse subject and style LoRAs into one scheduled LoRA file, and replay its schedule.

The public replay API is `attach`: `with attach(pipe, "fused.safetensors"): pipe(...)`. It imports only torch,
safetensors and json (plus the pipeline it is handed), so deployments need none of the converter's extras.
"""

from .merge.errors import FormatError, LoraschedError
from .merge.replay import ReplayHandle, attach

__all__ = ["FormatError", "LoraschedError", "ReplayHandle", "attach"]
__version__ = "0.2.0"
