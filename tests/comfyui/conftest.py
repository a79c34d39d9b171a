"""The vendored ComfyUI on sys.path (CPU), the node pack loaded the way ComfyUI loads a custom node, and the tiny
worlds of worlds.py as fixtures.

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

from worlds import (comfy_clip, comfy_flux, comfy_unet, make_flux_world, make_sd_sets,  # noqa: E402
                    make_sd_world, make_sdxl_world)


@pytest.fixture(scope="session")
def node() -> type:
    """The node class, from the pack loaded as ComfyUI loads a folder in custom_nodes (`nodes.load_custom_node`)."""
    assert asyncio.run(nodes.load_custom_node(str(NODE_PACK)))
    return nodes.NODE_CLASS_MAPPINGS["LoraschedLoadScheduledLora"]


def pack_module(name: str):
    """A module of the node pack, under the name ComfyUI's loader gives it (the folder's path, dots as `_x_`)."""
    return sys.modules[f"{str(NODE_PACK).replace('.', '_x_')}.{name}"]


@pytest.fixture(scope="session")
def sd(tmp_path_factory) -> SimpleNamespace:
    return make_sd_world(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="session")
def sd_sets(sd, tmp_path_factory) -> SimpleNamespace:
    return make_sd_sets(sd, tmp_path_factory.mktemp("sd_sets"))


@pytest.fixture(scope="session")
def flux(tmp_path_factory) -> SimpleNamespace:
    return make_flux_world(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory) -> SimpleNamespace:
    return make_sdxl_world(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture
def sd_model(sd):
    """A fresh ComfyUI SD1.5 model of the tiny UNet (each test gets its own weights to patch)."""
    return lambda dtype=torch.float32: comfy_unet(sd.pipe.unet, dtype)


@pytest.fixture
def sdxl_model(sdxl):
    return lambda: comfy_unet(sdxl.pipe.unet)


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
def apply(node, loras_folder):
    """Apply the node as a workflow does: the file sits in a loras folder and is picked by name."""

    def load(model, path: Path, clip=None, strength_model: float = 1.0, strength_clip: float = 0.0):
        if path.parent != loras_folder:
            shutil.copy(path, loras_folder / path.name)
        assert path.name in folder_paths.get_filename_list("loras")
        return node.execute(model, clip, path.name, strength_model, strength_clip).result

    return load
