"""The reader gives, bit for bit, the factors, scalings and dtypes a real `load_lora_weights` puts into PEFT layers,
for every input layout the tests write, every readable fixture file and the real SD1.5/SDXL/FLUX configs; the
layouts that diffusers only renames stay in the file (read per access), the others are held in memory.

The oracle is the loading path lorasched used before it stopped injecting adapters: the base pipeline built with
empty CPU weights, alphas folded as the reader folds them, `load_lora_weights` (or the denoiser's
`load_lora_adapter` for denoiser-relative files), and each PEFT layer's `lora_A`, `lora_B` and `scaling` read back.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, SHARED, needs_shared
from lora_formats import (
    DEFAULT_TARGETS,
    attn_procs_lora,
    flux_kohya_lora,
    kohya_lora,
    peft_lora,
    sgm_kohya_lora,
    xlabs_flux_lora,
)
from lorasched.merge.base import load_skeleton
from lorasched.merge.lora_io import StoredFactor, adapter_config, denoiser_prefix, kohya_folds, open_lora, read_lora
from lorasched.merge.names import canonical_name
from lorasched.merge.quiet import collected_loading_messages
from lorasched.tiny import ARCHITECTURES, save_sd_configs
from safetensors.torch import save_file

CONVS = ("conv1", "conv2", "downsamplers.0.conv")
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")


def peft_pipeline(base: str, dtype: torch.dtype):
    """The base pipeline with empty CPU weights, as lorasched built it for `load_lora_weights`."""
    import diffusers

    skeleton = load_skeleton(base, dtype)
    cls = getattr(diffusers, skeleton.pipeline_class)
    components = {name: module.to_empty(device="cpu") for name, module in skeleton.components.items()}
    accepted = inspect.signature(cls.__init__).parameters
    args = {name: components.get(name) for name in accepted if name not in ("self", "kwargs")}
    scheduler = json.loads((Path(base) / "model_index.json").read_text())["scheduler"][1]
    args["scheduler"] = getattr(diffusers, scheduler).from_pretrained(Path(base) / "scheduler")
    if "requires_safety_checker" in accepted:
        args["requires_safety_checker"] = False
    return cls(**args)


def peft_read(path, base: str, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """name -> (lora_A, lora_B, scaling) of every PEFT layer a real load creates."""
    raw = open_lora(path, allow_pickle=True)
    pipe = peft_pipeline(base, dtype)
    tensors = {key: raw.tensors[key] for key in raw.tensors}
    for down, (alpha, factor) in kohya_folds(tensors).items():
        tensors[down] = tensors[down] * factor
        del tensors[alpha]
    config = adapter_config(raw)
    with collected_loading_messages():
        if config is None:
            pipe.load_lora_weights(tensors, adapter_name="x", low_cpu_mem_usage=True)
        else:
            pipe.load_lora_weights(str(path), adapter_name="x", low_cpu_mem_usage=True)
        components = [n for n in pipe._lora_loadable_modules if getattr(pipe, n, None) is not None]
        layers = {canonical_name(c, getattr(pipe, c), n): m for c in components
                  for n, m in getattr(pipe, c).named_modules() if "x" in getattr(m, "lora_A", {})}
        if not layers:
            denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
            denoiser.load_lora_adapter(tensors, prefix=denoiser_prefix(tensors), adapter_name="x", metadata=config,
                                       low_cpu_mem_usage=True)
            layers = {canonical_name(components[0], denoiser, n): m for n, m in denoiser.named_modules()
                      if "x" in getattr(m, "lora_A", {})}
    return {name: (layer.lora_A["x"].weight.detach(), layer.lora_B["x"].weight.detach(), float(layer.scaling["x"]))
            for name, layer in layers.items()}


def assert_same_as_a_load(path, base, dtype=None) -> dict:
    """The reader's modules equal the oracle's, bit for bit, in the same order; returns them."""
    raw = open_lora(path, allow_pickle=True)
    dtype = dtype or raw.dtype
    read = read_lora(raw, load_skeleton(str(base), dtype), "x").modules
    expected = peft_read(path, str(base), dtype)
    assert list(read) == list(expected)
    for name, (down, up, scale) in expected.items():
        module = read[name]
        assert module.down.dtype == down.dtype and module.up.dtype == up.dtype, name
        assert torch.equal(module.down, down) and torch.equal(module.up, up), name
        assert module.scale == scale, (name, module.scale, scale)
    return read


def test_the_known_loaders_are_the_pipelines_own():
    import diffusers
    from lorasched.merge.base import KNOWN_LOADERS, lora_loader

    for pipeline, loader in KNOWN_LOADERS.items():
        own = next(c for c in getattr(diffusers, pipeline).__mro__ if "load_lora_weights" in vars(c))
        assert own.__name__ == loader and lora_loader(pipeline, "base") is own


def stored(modules) -> bool:
    return all(isinstance(m._down, StoredFactor) and isinstance(m._up, StoredFactor) for m in modules.values())


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny SD1, SDXL and FLUX pipelines and their saved folders."""
    folder = tmp_path_factory.mktemp("bases")
    out = {}
    for name in ("sd1", "sdxl", "flux"):
        pipe = ARCHITECTURES[name]()
        pipe.save_pretrained(folder / name)
        out[name] = (pipe, folder / name)
    return out


def _sd(p, **kwargs):
    return peft_lora(p["sd1"][0], "unet", DEFAULT_TARGETS + CONVS, seed=1, **kwargs)


def _sdxl(p):
    pipe = p["sdxl"][0]
    tensors = peft_lora(pipe, "unet", ("to_q", "conv1", "downsamplers.0.conv", "ff.net.2"), rank=4, seed=1)
    tensors |= peft_lora(pipe, "text_encoder", TEXT, rank=4, seed=2)
    return tensors | peft_lora(pipe, "text_encoder_2", TEXT[2:], rank=8, seed=3)


# name: (architecture, writer, whether the factors stay in the file)
LAYOUTS = {
    "kohya alpha + LoCon": ("sd1", lambda p: kohya_lora(_sd(p, rank=4), 2.0), True),
    "kohya no alpha": ("sd1", lambda p: kohya_lora(_sd(p, rank=8), None), True),
    "PEFT fp16 mixed ranks": ("sd1", lambda p: _sd(p, rank={"to_q": 2, "": 6}, dtype=torch.float16), True),
    "PEFT bf16": ("sd1", lambda p: _sd(p, rank=4, dtype=torch.bfloat16), True),
    "denoiser-relative": ("sd1", lambda p: {k.removeprefix("unet."): v for k, v in _sd(p, rank=4).items()}, True),
    "raw PEFT": ("sd1", lambda p: {"base_model.model." + k.removeprefix("unet."): v
                                   for k, v in _sd(p, rank=4).items()}, True),
    "attention processors": ("sd1", lambda p: attn_procs_lora(p["sd1"][0], rank=4), True),
    "SDXL kohya SGM + both CLIPs": ("sdxl", lambda p: sgm_kohya_lora(_sdxl(p), 2.0, p["sdxl"][0].unet.config), True),
    "SDXL PEFT + both CLIPs": ("sdxl", _sdxl, True),
    "FLUX kohya alpha": ("flux", lambda p: flux_kohya_lora(p["flux"][0], rank=4, alpha=2.0), False),
    "FLUX kohya": ("flux", lambda p: flux_kohya_lora(p["flux"][0], rank=4, alpha=None), False),
    "XLabs FLUX": ("flux", lambda p: xlabs_flux_lora(p["flux"][0], rank=4), False),
    "ai-toolkit FLUX bf16": ("flux", lambda p: peft_lora(p["flux"][0], "transformer", ("to_q", "proj_mlp",
                             "norm.linear", "ff.net.2"), rank={"to_q": 2, "proj_mlp": 8, "": 4},
                             dtype=torch.bfloat16), True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_reads_as_a_load_bit_for_bit(bases, tmp_path, layout):
    architecture, writer, in_file = LAYOUTS[layout]
    path = tmp_path / "lora.safetensors"
    save_file(writer(bases), path)
    modules = assert_same_as_a_load(path, bases[architecture][1])
    assert stored(modules) == in_file


def test_a_pair_in_two_dtypes_reads_both_at_the_promoted_dtype(bases, tmp_path):
    """A load casts adapter weights to the skeleton's (the pair's promoted) dtype; the fold stays in fp16."""
    path = tmp_path / "fp16.safetensors"
    tensors = kohya_lora(_sd(bases, rank=4), 3.0)
    save_file({k: v.half() if v.ndim else v for k, v in tensors.items()}, path)
    modules = assert_same_as_a_load(path, bases["sd1"][1], torch.float32)
    assert {m.down.dtype for m in modules.values()} == {torch.float32}


@pytest.mark.parametrize("rslora", [False, True])
def test_a_file_with_its_saved_lora_config_scales_as_that_config_says(bases, tmp_path, rslora):
    from diffusers import StableDiffusionPipeline

    layers = {k.removeprefix("unet."): v for k, v in _sd(bases, rank=4).items()}
    config = {"r": 4, "lora_alpha": 6, "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in layers}),
              "use_rslora": rslora}
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata=config)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    modules = assert_same_as_a_load(path, bases["sd1"][1])
    assert {m.scale for m in modules.values()} == {6 / 2.0 if rslora else 6 / 4}


def test_the_session_kohya_pair_reads_as_a_load(tiny_base, kohya_pair):
    for path in kohya_pair:
        assert stored(assert_same_as_a_load(path, tiny_base))


READABLE = ("FaithSang+anime-lora-gnerator+adapter_model.safetensors",
            "FaithSang+anime-lora-gnerator+pytorch_lora_weights.safetensors",
            "Haseebae+Synthetic_dataset_generator_with_stable_diffusion+pytorch_lora_weights.safetensors",
            "Riniii09+IAssignment2+pytorch_lora_weights.safetensors",
            "catundchat+stable-diffusion-v1.5-lora+pytorch_lora_weights.bin",
            "catundchat+stable-diffusion-v1.5-lora+pytorch_lora_weights.safetensors",
            "filip131311+prject-dyfuzja-ml+pytorch_lora_weights.safetensors",
            "reddinft+sandmantales-hackathon+pytorch_lora_weights.safetensors")


@needs_shared
@pytest.mark.parametrize("name", READABLE + ("vfph55+my_lora+pytorch_lora_weights.safetensors",))
def test_every_readable_fixture_file_reads_as_a_load(tmp_path_factory, name):
    version = "sd21" if name.startswith("vfph55") else "sd15"
    base = save_sd_configs(tmp_path_factory.mktemp(version), version)
    assert_same_as_a_load(FIXTURES / name, base)


@needs_shared
@pytest.mark.parametrize("base", ["sd15", "sdxl", "flux"])
def test_the_real_configs_read_kohya_and_peft_files_with_text_encoders_as_a_load(tmp_path, base):
    folder = SHARED / "fixtures" / "bases" / base
    skeleton = load_skeleton(str(folder), torch.float16)
    denoiser = "transformer" if base == "flux" else "unet"
    targets = ("attn.to_q", "attn.add_k_proj", "proj_mlp") if base == "flux" else \
        ("attn2.to_k", "attn1.to_out.0", "downsamplers.0.conv", "proj_in")
    tensors = peft_lora(skeleton, denoiser, targets, rank=4, seed=1, dtype=torch.float16)
    for component in ("text_encoder", "text_encoder_2"):
        if component in skeleton.components:
            tensors |= peft_lora(skeleton, component, ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1"), rank=8,
                                 seed=2, dtype=torch.float16)
    files = {"peft": tensors} if base == "flux" else {"peft": tensors, "kohya": kohya_lora(tensors, 2.0)}
    for label, content in files.items():
        path = tmp_path / f"{label}.safetensors"
        save_file(content, path)
        assert stored(assert_same_as_a_load(path, folder)), label


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e5m2])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_value_anywhere_is_found(dtype, value):
    """The finiteness check (min and max, or a float32 sum for float8) finds one bad value at any position."""
    from lorasched.merge.lora_io import all_finite

    for shape in [(1, 1), (7, 3), (320, 1280)]:
        tensor = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.1).to(dtype)
        assert all_finite(tensor)
        for position in {0, tensor.numel() // 3, tensor.numel() - 1}:
            bad = tensor.clone()
            bad.view(-1)[position] = value
            assert not all_finite(bad), (shape, position)
