"""LyCORIS inputs: files made by LyCORIS' own module classes convert to the deltas ComfyUI's own weight adapters
and LyCORIS itself compute for the same files (float64, relative 1e-5), through lorasched's whole reading path
onto a tiny base."""

from __future__ import annotations

import sys

import pytest
import torch
from comfy.weight_adapter.loha import LoHaAdapter
from comfy.weight_adapter.lokr import LoKrAdapter
from comfy.weight_adapter.lora import LoRAAdapter
from conftest import REPO
from lorasched.merge.checks import LoraSpec
from lorasched.merge.errors import LoraschedError
from lorasched.merge.lora import STYLE, SUBJECT
from lorasched.merge.lora_io import read_set
from lorasched.tiny import random_kohya_lora, tiny_sd_pipeline
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(REPO / "tests"))
from lycoris_files import VARIANTS, save_lycoris  # noqa: E402
from reference import reference_sample, sample  # noqa: E402
from worlds import KLORA_STEPS, _merge, sd_conditioning  # noqa: E402

ADAPTERS = {"lokr": LoKrAdapter, "loha": LoHaAdapter, "locon": LoRAAdapter}
# The pinned ComfyUI's LoKr adapter fails on a Tucker conv (`kron(...).reshape` of a non-contiguous view: it logs
# "view size is not compatible" and leaves the weight as it was); LyCORIS' own delta is the reference there.
COMFY_CANNOT = {("lokr-tucker", 4)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lycoris")
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(folder / "base")
    style = folder / "style.safetensors"
    save_file(random_kohya_lora(pipe, 4, 4.0, seed=9), style)
    return pipe, folder, style


def _layers(pipe) -> dict[str, tuple[str, torch.nn.Module]]:
    """kohya prefix -> (lorasched's module name, layer)."""
    layers = {}
    for prefix, component, model in (("lora_unet_", "unet", pipe.unet), ("lora_te_", "text_encoder", pipe.text_encoder)):
        for path, layer in model.named_modules():
            name = path if prefix == "lora_unet_" or path.startswith("text_model.") else "text_model." + path
            layers[prefix + name.replace(".", "_")] = (f"{component}.{name}", layer)
    return layers


def _comfy_delta(adapter, prefix: str, state: dict, layer: torch.nn.Module) -> torch.Tensor:
    alpha_key = f"{prefix}.alpha"
    alpha = float(state[alpha_key]) if alpha_key in state else None
    patch = adapter.load(prefix, state, alpha, None)
    zero = torch.zeros(layer.weight.shape, dtype=torch.float64)
    return patch.calculate_weight(zero, prefix, 1.0, 1.0, None, lambda x: x, intermediate_dtype=torch.float64)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "dora"])
def test_lycoris_files_convert_to_comfyuis_deltas(world, variant):
    pipe, folder, style = world
    path = folder / f"{variant}.safetensors"
    expected = save_lycoris(pipe, variant, path, seed=3)
    state = {key: value.double() for key, value in load_file(path).items()}
    loras = read_set(str(folder / "base"), [LoraSpec(str(path), SUBJECT), LoraSpec(str(style), STYLE)])
    modules = loras.sources[0].lora.modules
    prefixes = sorted({key.split(".")[0] for key in state})
    assert len(prefixes) == len(modules) > 10
    layers = _layers(pipe)
    for prefix in prefixes:
        name, layer = layers[prefix]
        module = modules[name]
        ours = module.scale * (module.up.double().flatten(1) @ module.down.double().flatten(1))
        references = {"LyCORIS": expected[prefix].flatten(1)}
        if (variant, layer.weight.dim()) not in COMFY_CANNOT:
            references["ComfyUI"] = _comfy_delta(ADAPTERS[variant.split("-")[0]], prefix, state, layer).flatten(1)
        for who, theirs in references.items():
            error = (ours - theirs).norm() / theirs.norm()
            assert error <= 1e-5, (variant, prefix, who, float(error))


def test_a_dora_file_is_refused_in_one_line(world):
    pipe, folder, style = world
    path = folder / "dora.safetensors"
    save_lycoris(pipe, "dora", path, seed=4)
    with pytest.raises(LoraschedError) as error:
        read_set(str(folder / "base"), [LoraSpec(str(path), SUBJECT), LoraSpec(str(style), STYLE)])
    message = str(error.value)
    assert message.startswith(f"{path}: DoRA") and "base weights" in message and "\n" not in message


@pytest.mark.parametrize("variant", ["lokr-tucker", "loha-tucker"])
def test_a_file_merged_from_a_lycoris_subject_replays_in_the_node(sd, sd_model, apply, variant, tmp_path):
    """K-LoRA of a LyCORIS subject (Tucker convs) and the kohya style: the node's run equals the same model with
    every step's weights set by hand from the file."""
    subject = tmp_path / f"{variant}.safetensors"
    save_lycoris(sd.pipe, variant, subject, seed=6)
    path = _merge(sd.folder / "base", (subject, sd.pair[1]), tmp_path / f"{variant}_klora.safetensors")
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    conds = sd_conditioning(0)
    (model, _) = apply(sd_model(), path)
    out = sample(model, noise, conds, KLORA_STEPS, "euler", cfg=5.0)
    reference = reference_sample(sd_model(), path, noise, conds, KLORA_STEPS, "euler", cfg=5.0)
    base = sample(sd_model(), noise, conds, KLORA_STEPS, "euler", cfg=5.0)
    assert (out - reference).abs().max().item() <= 1e-4
    assert (out - base).abs().max().item() > 1e-2
