"""The vendored ComfyUI on sys.path (CPU), the node pack loaded the way ComfyUI loads a custom node, and tiny
worlds: lorasched files merged by lorasched from tiny diffusers pipelines, plus ComfyUI models of those pipelines.

Run from the repository root with the ComfyUI venv: `.venv-comfy/bin/python -m pytest tests/comfyui`.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
COMFYUI = Path(__file__).resolve().parents[3] / "shared" / "vendor" / "ComfyUI"
NODE_PACK = REPO / "comfyui-lorasched"

sys.dont_write_bytecode = True  # the vendored ComfyUI is read-only in CI
sys.path.insert(0, str(COMFYUI))
_argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]  # ComfyUI reads its options from argv once enabled
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing(True)
import comfy.cli_args  # noqa: E402,F401
import comfy.sd  # noqa: E402,F401
import folder_paths  # noqa: E402
import nodes  # noqa: E402

sys.argv = _argv
torch.set_num_threads(1)  # tiny models gain nothing from intra-op threads; a shared 2-core host loses a lot

from worlds import comfy_clip, comfy_flux, comfy_sd15, peft_lora  # noqa: E402

KLORA_STEPS = 8  # the reference step count written into the files
SD_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FLUX_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "proj_mlp", "proj_out", "ff.net.2")


@pytest.fixture(scope="session")
def pack() -> SimpleNamespace:
    """The node pack as ComfyUI loads it from custom_nodes (`nodes.load_custom_node`), and its modules."""
    assert asyncio.run(nodes.load_custom_node(str(NODE_PACK)))
    name = str(NODE_PACK).replace(".", "_x_")  # ComfyUI's module name for a custom node folder
    return SimpleNamespace(node=nodes.NODE_CLASS_MAPPINGS["LoraschedLoadScheduledLora"],
                           replay=sys.modules[f"{name}.replay"], file=sys.modules[f"{name}.scheduled_file"],
                           nodes=sys.modules[f"{name}.nodes"])


def _merge(base: Path, pair: tuple[Path, Path], output: Path, method: str = "klora", **options) -> Path:
    from lorasched.convert import Calibration, merge
    from lorasched.merge import rules

    calibration = options.pop("calibration", Calibration())
    merge(str(base), *map(str, pair), str(output), method, rules.RuleOptions(**options), steps=KLORA_STEPS,
          device="cpu", calibration=calibration)
    return output


@pytest.fixture(scope="session")
def sd(tmp_path_factory) -> SimpleNamespace:
    """The tiny SD pipeline, a kohya subject/style pair with text-encoder parts (the style over other modules
    too), and three lorasched files: K-LoRA `s`, K-LoRA `s*`, and feature-kl (calibrated, noise axis)."""
    from lorasched.convert import Calibration
    from lorasched.tiny import random_kohya_lora, tiny_sd_pipeline
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("sd")
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(folder / "base")
    pair = folder / "subject.safetensors", folder / "style.safetensors"
    save_file(random_kohya_lora(pipe, 4, 2.0, seed=1, text_encoder=True), pair[0])
    save_file(random_kohya_lora(pipe, 8, 3.0, seed=2, targets=("to_q", "to_k", "to_v", "ff.net.2"),
                                text_encoder=True), pair[1])
    calibration = Calibration(prompts=("a photo of sks dog",), seeds=(0, 1), size=32, guidance=5.0)
    files = {
        "klora-s": _merge(folder / "base", pair, folder / "klora_s.safetensors", pattern="s"),
        "klora-s*": _merge(folder / "base", pair, folder / "klora_sstar.safetensors", pattern="s*"),
        "feature-kl": _merge(folder / "base", pair, folder / "feature_kl.safetensors", "feature-kl",
                             calibration=calibration),
    }
    return SimpleNamespace(pipe=pipe, pair=pair, files=files, folder=folder)


@pytest.fixture(scope="session")
def flux(tmp_path_factory) -> SimpleNamespace:
    """The tiny FLUX pipeline, a PEFT subject/style pair over every block linear, and a K-LoRA `s*` file
    (diffusers tensor format, the default for FLUX)."""
    from lorasched.tiny import tiny_flux_pipeline
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("flux")
    pipe = tiny_flux_pipeline()
    pipe.save_pretrained(folder / "base")
    pair = folder / "subject.safetensors", folder / "style.safetensors"
    save_file(peft_lora(pipe.transformer, "transformer", FLUX_TARGETS, rank=4, seed=1), pair[0])
    save_file(peft_lora(pipe.transformer, "transformer", FLUX_TARGETS[:8], rank=6, seed=2), pair[1])
    files = {"klora-s*": _merge(folder / "base", pair, folder / "klora_sstar.safetensors", pattern="s*")}
    return SimpleNamespace(pipe=pipe, pair=pair, files=files, folder=folder)


@pytest.fixture
def sd_model(sd):
    """A fresh ComfyUI SD1.5 model of the tiny UNet (each test gets its own weights to patch)."""
    return lambda dtype=torch.float32: comfy_sd15(sd.pipe.unet, dtype)


@pytest.fixture
def flux_model(flux):
    return lambda: comfy_flux(flux.pipe.transformer)


@pytest.fixture
def sd_clip(sd):
    return lambda: comfy_clip(sd.pipe.text_encoder)


@pytest.fixture
def loras_folder(tmp_path):
    """A folder registered as one of ComfyUI's `loras` folders, as a user's ComfyUI/models/loras would be."""
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    yield tmp_path
    folder_paths.folder_names_and_paths["loras"][0].remove(str(tmp_path))


@pytest.fixture
def apply(pack, loras_folder):
    """Apply the node as a workflow does: the file sits in a loras folder and is picked by name."""

    def load(model, path: Path, clip=None, strength_model: float = 1.0, strength_clip: float = 0.0):
        if path.parent != loras_folder:
            shutil.copy(path, loras_folder / path.name)
        assert path.name in folder_paths.get_filename_list("loras")
        return pack.node().load(model, clip, path.name, strength_model, strength_clip)

    return load
