"""Module names: the canonical names every loader expects, whatever transformers version is installed.

Inside lorasched a module is named by its diffusers pipeline path, component first
(`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`). Two things vary with versions and must not
leak into files:

- transformers 5 flattens `CLIPTextModel` (no `text_model.` level; `CLIPTextModelWithProjection` keeps it). The
  ecosystem (kohya `lora_te_text_model_…`, A1111, ComfyUI, diffusers PEFT files) names CLIP layers with the level,
  so module names always carry it (`text_encoder.text_model.encoder.layers.0.mlp.fc1`) and `get_module` resolves
  them on either version.
- kohya's SDXL trainer writes SGM (LDM `openaimodel`) UNet names (`lora_unet_input_blocks_4_1_…`), which A1111,
  Forge, ComfyUI and diffusers all read; diffusers-style SDXL kohya names are misplaced by A1111's converter.

Key conversion itself is diffusers' (`convert_state_dict_to_kohya`); this module only fixes the module path fed
to it. Import-light: torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LoraschedError

TEXT_MODEL = "text_model."
_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_SGM_MIDDLE = {("resnets", "0"): "0", ("attentions", "0"): "1", ("resnets", "1"): "2"}
_SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}


def _flattened_clip(model: torch.nn.Module) -> bool:
    """A transformers-5 `CLIPTextModel`: its layers sit at the top instead of under `text_model`."""
    return type(model).__name__ == "CLIPTextModel" and not hasattr(model, "text_model")


def canonical_name(component: str, model: torch.nn.Module, path: str) -> str:
    """`<component>.<path>` with the `text_model.` level a flattened CLIP lacks."""
    if _flattened_clip(model) and not path.startswith(TEXT_MODEL):
        path = TEXT_MODEL + path
    return f"{component}.{path}"


def get_module(pipe, name: str) -> torch.nn.Module:
    """The pipeline's module for a canonical name on any transformers version (and for the uncanonical CLIP
    names of files written before names were canonical)."""
    component, _, path = name.partition(".")
    model = getattr(pipe, component)
    if _flattened_clip(model):
        path = path.removeprefix(TEXT_MODEL)
    elif type(model).__name__.startswith("CLIPTextModel") and not path.startswith(TEXT_MODEL):
        path = TEXT_MODEL + path
    return model.get_submodule(path)


@dataclass(frozen=True)
class SgmLayout:
    """What SGM UNet names depend on: resnets per level, and which up levels have attention."""

    layers_per_block: int
    up_attention: tuple[bool, ...]

    @classmethod
    def of(cls, unet_config) -> SgmLayout:
        return cls(unet_config.layers_per_block, tuple("CrossAttn" in kind for kind in unet_config.up_block_types))

    def path(self, path: str) -> str:
        """A diffusers UNet module path in the SGM tree: `input_blocks` start with conv_in, then per level
        `layers_per_block` (resnet[, attention]) and a downsampler `op`; `output_blocks` hold `layers_per_block + 1`
        (resnet[, attention]) per level, the upsampler after them at index 2 (1 without attention);
        `middle_block` is resnet, attention, resnet."""
        per_level = self.layers_per_block + 1
        for diffusers_name, sgm_name in _SGM_TOP.items():
            if path == diffusers_name:
                return sgm_name
        parts = path.split(".")
        if parts[0] == "mid_block":
            block, rest = ["middle_block", _SGM_MIDDLE[parts[1], parts[2]]], parts[3:]
        elif parts[0] == "down_blocks" and parts[2] == "downsamplers":
            return f"input_blocks.{(int(parts[1]) + 1) * per_level}.0.op"
        elif parts[0] == "down_blocks":
            inner = "1" if parts[2] == "attentions" else "0"
            block, rest = ["input_blocks", str(1 + int(parts[1]) * per_level + int(parts[3])), inner], parts[4:]
        elif parts[0] == "up_blocks" and parts[2] == "upsamplers":
            level = int(parts[1])
            index = 2 if self.up_attention[level] else 1
            return f"output_blocks.{level * per_level + self.layers_per_block}.{index}.conv"
        elif parts[0] == "up_blocks":
            inner = "1" if parts[2] == "attentions" else "0"
            block, rest = ["output_blocks", str(int(parts[1]) * per_level + int(parts[3])), inner], parts[4:]
        else:
            raise LoraschedError(f"{path}: no SGM name for this UNet module")
        if "resnets" in parts[:3]:  # LDM names a resnet's layers by position in its Sequentials
            rest = [_SGM_RESNET.get(rest[0], rest[0])] + rest[1:]
        return ".".join(block + rest)


def kohya_key(name: str, single_text_encoder: bool, sgm: SgmLayout | None = None) -> str:
    """The kohya prefix of a module (`lora_unet_…`, `lora_te_text_model_…`), via diffusers' PEFT→kohya converter;
    UNet modules under SGM names when `sgm` is given (SDXL)."""
    from diffusers.utils import convert_state_dict_to_kohya

    component, _, path = name.partition(".")
    if sgm is not None and component == "unet":
        return "lora_unet_" + sgm.path(path).replace(".", "_")
    probe = {f"{name}.lora_A.weight": torch.zeros(1, 1)}
    key = next(iter(convert_state_dict_to_kohya(probe))).split(".")[0]
    if single_text_encoder and key.startswith("lora_te1_"):
        key = "lora_te_" + key.removeprefix("lora_te1_")
    return key
