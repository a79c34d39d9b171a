"""The node: Load Scheduled LoRA (lorasched). Text encoders get the file's LoRA statically through ComfyUI's
LoRA loader; the denoiser gets one `ScheduledLoRA` patch per layer and the `Replay` clock (see replay.py)."""

from __future__ import annotations

import os

import comfy.lora
import comfy.sd
import folder_paths
import torch
from comfy.patcher_extension import WrappersMP

from .patching import scheduled_patches, targets
from .replay import HOST, Replay, ScheduledLoRA
from .schema import Layer, ScheduledFile, read

WRAPPER_KEY = "lorasched"


def patch_denoiser(model, scheduled: ScheduledFile, layers: dict[str, Layer], strength: float):
    """A clone of `model` with one ScheduledLoRA per layer and the clock; `model` itself is left as it was.
    Every patch goes in with ComfyUI's `add_patches`; those whose schedule never switches are plain static LoRAs."""
    patches = scheduled_patches(HOST, ScheduledLoRA, scheduled, layers, model.model,
                                model.get_model_object("model_sampling"))
    patched = model.clone()
    patched.add_patches(patches, strength)
    switching = [patch for patch in patches.values() if patch.module.switches]
    if switching:  # a schedule without switches (`direct`) needs no clock
        replay = Replay(scheduled.path, scheduled.axis, switching)
        patched.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, replay.sampler_sample)
        patched.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, WRAPPER_KEY, replay.predict_noise)
    return patched


def patch_text_encoders(clip, scheduled: ScheduledFile, layers: dict[str, Layer], strength: float):
    """The text encoders run once per prompt, outside the denoising loop: each gets its first phase's sources
    (every LoRA that adapts it, as lorasched writes them) through ComfyUI's own LoRA loader."""
    modules = [module for module in layers.values() if not module.is_denoiser and module.phases[0][1]]
    if not modules:
        return clip
    targets(HOST, scheduled, modules, comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}),
            clip.cond_stage_model, "text encoder")
    lora = {}
    for module in modules:
        active = module.phases[0][1]
        lora[f"{module.key}.lora_down.weight"] = torch.cat([module.factors[source][0] for source in active], 0)
        lora[f"{module.key}.lora_up.weight"] = torch.cat([module.factors[source][1] for source in active], 1)
    return comfy.sd.load_lora_for_models(None, clip, lora, 0.0, strength)[1]


class LoadScheduledLora:
    """Load Scheduled LoRA (lorasched): a lorasched file replayed per layer and per step."""

    def __init__(self) -> None:
        self._cached: tuple[str, float, ScheduledFile, dict[str, Layer]] | None = None

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the schedule is replayed on."}),
                "clip": ("CLIP", {"tooltip": "The text encoder(s) the file's text-encoder part is applied to."}),
                "lora_name": (folder_paths.get_filename_list("loras"),
                              {"tooltip": "A scheduled LoRA exported by lorasched (from the loras folder)."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
            }
        }

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load"
    CATEGORY = "loaders"
    DESCRIPTION = ("Loads a lorasched scheduled LoRA (subject, style and static LoRAs fused into one file) and "
                   "replays its schedule: at every sampling step each layer carries the LoRAs the file says (one, "
                   "several or none). LoraLoader on the same file applies only its static mix.")

    def load(self, model, clip, lora_name: str, strength_model: float, strength_clip: float):
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        scheduled, layers = self._read(path)
        if strength_model != 0:
            model = patch_denoiser(model, scheduled, layers, strength_model)
        if strength_clip != 0:
            clip = patch_text_encoders(clip, scheduled, layers, strength_clip)
        return model, clip

    def _read(self, path: str) -> tuple[ScheduledFile, dict[str, Layer]]:
        """Parse (and hash-check) a file once per version of it."""
        mtime = os.path.getmtime(path)
        if self._cached is None or self._cached[:2] != (path, mtime):
            scheduled = read(path, with_tensors=True)
            self._cached = (path, mtime, scheduled, scheduled.layers())
        return self._cached[2:]


NODE_CLASS_MAPPINGS = {"LoraschedLoadScheduledLora": LoadScheduledLora}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraschedLoadScheduledLora": "Load Scheduled LoRA (lorasched)"}
