"""comfyui-lorasched: replay a lorasched scheduled LoRA (per layer, per step) inside ComfyUI (a V3 node pack)."""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
