"""Merges against the real SD1.5, SDXL and FLUX.1-dev config folders in shared/fixtures/bases, and every exported
key checked against the names the ecosystem's loaders expect, whatever transformers version is installed.

What the loaders expect (read from their code): kohya sd-scripts and A1111 build their kohya names from the module
tree they train on — SD1.x UNet names as diffusers writes them, SDXL UNet names from the SGM (LDM `openaimodel`)
tree, text encoders under transformers-4 CLIP names (`text_model.encoder.layers.N…`) behind `lora_te_` (SD1.x) or
`lora_te1_`/`lora_te2_` (SDXL). ComfyUI maps those and diffusers PEFT names (`text_encoder.text_model.…`,
`transformer.…`). diffusers alone also accepts CLIP names without `text_model.`, which is why this test does not
ask diffusers. The same files are checked against ComfyUI's own key map in tests/comfyui.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED, needs_shared
from lora_formats import kohya_lora, peft_lora
from lorasched.convert import merge
from lorasched.merge import fileformat
from lorasched.merge.base import load_skeleton
from lorasched.merge.lora_io import open_lora, read_lora
from safetensors import safe_open
from safetensors.torch import save_file

BASES = SHARED / "fixtures" / "bases"
UNET_TARGETS = ("attn2.to_k", "attn2.to_v", "attn1.to_out.0", "downsamplers.0.conv", "upsamplers.0.conv",
                "resnets.0.conv1", "time_emb_proj", "proj_in")
FLUX_TARGETS = ("attn.to_q", "attn.add_k_proj", "attn.to_add_out", "proj_mlp", "ff.net.2")
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1")
SUFFIXES = {"kohya": (".lora_down.weight", ".lora_up.weight"), "diffusers": (".lora_A.weight", ".lora_B.weight")}

pytestmark = needs_shared


def _clip_names(model: torch.nn.Module) -> set[str]:
    """A CLIP text model's Linear names as transformers 4 (and every checkpoint) writes them: under `text_model.`."""
    names = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return {name if name.startswith("text_model.") else "text_model." + name for name in names}


def _pair(skeleton, base: str, tmp_path, denoiser_targets) -> tuple[str, str]:
    """An fp16 subject (kohya) / style (PEFT) pair adapting the denoiser, the convs and every text encoder."""
    components = [c for c in ("text_encoder", "text_encoder_2") if c in skeleton._lora_loadable_modules]
    denoiser = "unet" if base != "flux" else "transformer"
    paths = []
    for seed, role in ((1, "subject"), (2, "style")):
        tensors = peft_lora(skeleton, denoiser, denoiser_targets, rank=4 * seed, seed=seed, dtype=torch.float16)
        for component in components:
            tensors |= peft_lora(skeleton, component, TEXT_TARGETS, rank=4, seed=seed, dtype=torch.float16)
        if role == "subject" and base != "flux":
            tensors = kohya_lora(tensors, alpha=None)
        paths.append(tmp_path / f"{base}-{role}.safetensors")
        save_file(tensors, paths[-1])
    return tuple(map(str, paths))


def _expected_kohya(skeleton, base: str) -> set[str]:
    """Every kohya module key a loader maps for this base (UNet and text encoders)."""
    unet = {name for name, module in skeleton.unet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
    expected = set()
    if base == "sd15":
        expected |= {"lora_unet_" + name.replace(".", "_") for name in unet}
        expected |= {"lora_te_" + name.replace(".", "_") for name in _clip_names(skeleton.text_encoder)}
    else:
        expected |= {"lora_te1_" + name.replace(".", "_") for name in _clip_names(skeleton.text_encoder)}
        expected |= {"lora_te2_" + name.replace(".", "_") for name in _clip_names(skeleton.text_encoder_2)}
    return expected


@pytest.mark.parametrize("base,tensor_format", [("sd15", "kohya"), ("sdxl", "kohya"), ("flux", "diffusers")])
def test_a_merge_against_the_real_configs_writes_only_canonical_keys_in_the_inputs_dtype(base, tensor_format,
                                                                                        tmp_path):
    skeleton = load_skeleton(str(BASES / base), torch.float16)
    targets = FLUX_TARGETS if base == "flux" else UNET_TARGETS
    subject, style = _pair(skeleton, base, tmp_path, targets)
    output = tmp_path / f"{base}-{tensor_format}.safetensors"
    merge(str(BASES / base), subject, style, str(output), tensor_format=tensor_format)

    with safe_open(str(output), "pt") as handle:
        keys = list(handle.keys())
        dtypes = {handle.get_slice(key).get_dtype() for key in keys}
    assert dtypes == {"F16"}, "an fp16 pair gives an fp16 file"
    down, up = SUFFIXES[tensor_format]
    stems = {key.removesuffix(down).removesuffix(up) for key in keys}
    assert len(keys) == 2 * len(stems), "every module has exactly a down and an up factor"
    records = fileformat.read(output).modules
    assert {record.key for record in records.values()} == stems

    text_stems = {s for s in stems if s.startswith(("lora_te", "text_encoder"))}
    assert len(text_stems) >= len(TEXT_TARGETS), "the text encoders' modules are exported"
    if tensor_format == "diffusers":  # FLUX: `transformer.<module>` and `text_encoder.text_model.…`, as ComfyUI maps
        modules = {"transformer." + name for name, _ in skeleton.transformer.named_modules()}
        modules |= {"text_encoder." + name for name in _clip_names(skeleton.text_encoder)}
        assert stems <= modules, sorted(stems - modules)[:5]
        assert all(s.startswith("text_encoder.text_model.") for s in text_stems)
        return
    expected = _expected_kohya(skeleton, base)
    assert {s for s in stems if s.startswith("lora_te")} <= expected
    unet_stems = {s for s in stems if s.startswith("lora_unet_")}
    if base == "sd15":
        assert unet_stems <= expected, sorted(unet_stems - expected)[:5]
        return
    # SDXL: kohya's SDXL trainer names (SGM blocks), which diffusers' own reader maps back onto our modules
    assert all(s.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for s in unet_stems), sorted(unet_stems)[:5]
    read = read_lora(open_lora(output), skeleton, "exported")
    assert set(read.modules) == set(records), "diffusers reads the SGM names back onto the same modules"
    assert any("upsamplers" in name for name in records), "the upsampler conv A1111 misplaced is covered"
