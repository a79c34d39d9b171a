"""The node: Load Scheduled LoRA (lorasched). Text encoders get the file's LoRA statically through ComfyUI's
LoRA loader; the denoiser gets one `ScheduledLoRA` patch per layer and the `Replay` clock (see replay.py)."""

from __future__ import annotations

import functools
import os

import comfy.lora
import comfy.sd
import folder_paths
import torch
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import ComfyExtension, io

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


class LoadScheduledLora(io.ComfyNode):
    """Load Scheduled LoRA (lorasched): a lorasched file replayed per layer and per step. A V3 node: stateless, so
    the parsed file is cached per file version at module level (`_read`)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraschedLoadScheduledLora",
            display_name="Load Scheduled LoRA (lorasched)",
            category="loaders",
            description=("Loads a lorasched scheduled LoRA (subject, style and static LoRAs fused into one file) and "
                         "replays its schedule: at every sampling step each layer carries the LoRAs the file says "
                         "(one, several or none). LoraLoader on the same file applies only its static mix."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the schedule is replayed on."),
                io.Clip.Input("clip", tooltip="The text encoder(s) the file's text-encoder part is applied to."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A scheduled LoRA exported by lorasched (from the loras folder)."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01),
            ],
            outputs=[io.Model.Output(), io.Clip.Output()],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name: str, **kwargs) -> float | None:
        """A file rewritten in place (a new merge to the same name) runs the node again."""
        path = folder_paths.get_full_path("loras", lora_name)
        return os.path.getmtime(path) if path else None

    @classmethod
    def execute(cls, model, clip, lora_name: str, strength_model: float, strength_clip: float) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        scheduled, layers = _read(path, os.path.getmtime(path))
        if strength_model != 0:
            model = patch_denoiser(model, scheduled, layers, strength_model)
        if strength_clip != 0:
            clip = patch_text_encoders(clip, scheduled, layers, strength_clip)
        return io.NodeOutput(model, clip)


@functools.lru_cache(maxsize=4)
def _read(path: str, mtime: float) -> tuple[ScheduledFile, dict[str, Layer]]:
    """Parse (and hash-check) a file once per version of it."""
    scheduled = read(path, with_tensors=True)
    return scheduled, scheduled.layers()


class LoraschedExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadScheduledLora]


async def comfy_entrypoint() -> LoraschedExtension:
    return LoraschedExtension()
