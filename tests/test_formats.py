"""Every input layout, written by the tests from a tiny pipeline's modules, is read as the ΔW the file means:
ΔW = alpha / r · up · down per module, fused qkv split by rows, in the file's own dtype; LyCORIS is refused."""

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from cli import main
from lora_formats import DEFAULT_TARGETS, attn_procs_lora, flux_kohya_lora, kohya_lora, peft_lora, xlabs_flux_lora
from merge.base import load_skeleton
from merge.errors import LoraschedError
from merge.lora_io import open_lora, read_lora
from tiny import ARCHITECTURES

CONVS = ("conv1", "conv2", "downsamplers.0.conv")


def read(base, tensors, tmp_path, name="lora"):
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, path)
    raw = open_lora(path)
    return read_lora(raw, load_skeleton(str(base), raw.dtype), name)


def peft_deltas(tensors, scale=1.0):
    """ΔW per module of a pipeline-level PEFT dict, computed here from its factors."""
    return {
        key.removesuffix(".lora_A.weight"): scale * (tensors[key.replace("lora_A", "lora_B")].double().flatten(1)
                                                     @ tensors[key].double().flatten(1))
        for key in tensors if key.endswith(".lora_A.weight")
    }


def assert_deltas(lora, expected, rtol=1e-6):
    assert set(lora.modules) == set(expected)
    for name, delta in expected.items():
        assert torch.allclose(lora.modules[name].delta(), delta, rtol=rtol, atol=1e-6 * delta.abs().max()), name


@pytest.fixture(scope="module")
def sd_pipe(tiny_base):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_base)


@pytest.mark.parametrize("alpha", [None, 2.0])
def test_kohya_with_and_without_alpha_and_locon_convs(sd_pipe, tiny_base, tmp_path, alpha):
    peft = peft_lora(sd_pipe, "unet", DEFAULT_TARGETS + CONVS, rank=4, seed=1)
    lora = read(tiny_base, kohya_lora(peft, alpha), tmp_path)
    assert any(module.down.dim() == 4 for module in lora.modules.values())
    assert_deltas(lora, peft_deltas(peft, 1.0 if alpha is None else alpha / 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_diffusers_peft_in_each_dtype_keeps_it(sd_pipe, tiny_base, tmp_path, dtype):
    peft = peft_lora(sd_pipe, "unet", DEFAULT_TARGETS, rank={"to_q": 2, "": 6}, seed=2, dtype=dtype)
    lora = read(tiny_base, peft, tmp_path)
    assert lora.dtype == dtype and {m.rank for m in lora.modules.values()} == {2, 6}
    assert_deltas(lora, peft_deltas(peft), rtol=1e-2 if dtype != torch.float32 else 1e-6)


def test_denoiser_relative_and_raw_peft_prefixes(sd_pipe, tiny_base, tmp_path):
    peft = peft_lora(sd_pipe, "unet", DEFAULT_TARGETS, rank=4, seed=3)
    expected = peft_deltas(peft)
    relative = {k.removeprefix("unet."): v for k, v in peft.items()}
    assert_deltas(read(tiny_base, relative, tmp_path, "relative"), expected)
    wrapped = {"base_model.model." + k: v for k, v in relative.items()}
    assert_deltas(read(tiny_base, wrapped, tmp_path, "wrapped"), expected)


def test_old_attention_processor_layout(sd_pipe, tiny_base, tmp_path):
    tensors = attn_procs_lora(sd_pipe, rank=4, seed=4)
    lora = read(tiny_base, tensors, tmp_path)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    stem = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    expected = tensors[f"{stem}.up.weight"].double() @ tensors[f"{stem}.down.weight"].double()
    assert len(lora.modules) == len(tensors) // 2
    assert torch.allclose(lora.modules[name].delta(), expected)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    pipe = ARCHITECTURES["flux"]()
    folder = tmp_path_factory.mktemp("flux") / "base"
    pipe.save_pretrained(folder)
    return pipe, folder


def fused_expected(down, up, names, scale):
    rows = torch.chunk(up.double(), len(names), 0)
    return {name: scale * (part @ down.double()) for name, part in zip(names, rows)}


@pytest.mark.parametrize("alpha", [None, 4.0])
def test_flux_kohya_bfl_names_split_fused_qkv(flux, tmp_path, alpha):
    pipe, base = flux
    tensors = flux_kohya_lora(pipe, rank=4, alpha=alpha, seed=5)
    lora = read(base, tensors, tmp_path)
    scale = 1.0 if alpha is None else alpha / 4
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    qkv = [f"transformer.transformer_blocks.0.attn.to_{p}" for p in "qkv"]
    for name, delta in fused_expected(tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"], qkv,
                                      scale).items():
        assert torch.allclose(lora.modules[name].delta(), delta), name
    key = "lora_unet_single_blocks_1_linear2"
    expected = scale * tensors[f"{key}.lora_up.weight"].double() @ tensors[f"{key}.lora_down.weight"].double()
    assert torch.allclose(lora.modules["transformer.single_transformer_blocks.1.proj_out"].delta(), expected)
    assert len(lora.modules) == 3 + 3 + 1 + 1 + 2


def test_xlabs_flux_layout(flux, tmp_path):
    pipe, base = flux
    tensors = xlabs_flux_lora(pipe, rank=4, seed=6)
    lora = read(base, tensors, tmp_path)
    stem = "double_blocks.0.processor.qkv_lora2"
    names = [f"transformer.transformer_blocks.0.attn.add_{p}_proj" for p in "qkv"]
    for name, delta in fused_expected(tensors[f"{stem}.down.weight"], tensors[f"{stem}.up.weight"], names,
                                      1.0).items():
        assert torch.allclose(lora.modules[name].delta(), delta), name
    assert len(lora.modules) == 8


def test_ai_toolkit_flux_layout_with_per_module_ranks(flux, tmp_path):
    pipe, base = flux
    peft = peft_lora(pipe, "transformer", ("to_q", "proj_mlp", "norm.linear", "ff.net.2"),
                     rank={"to_q": 2, "proj_mlp": 8, "": 4}, seed=7, dtype=torch.bfloat16)
    assert_deltas(read(base, peft, tmp_path), peft_deltas(peft), rtol=1e-2)


@pytest.mark.parametrize("suffixes, family", [
    ((".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".alpha"), "LyCORIS LoHa"),
    ((".lokr_w1", ".lokr_w2", ".alpha"), "LyCORIS LoKr"),
    ((".lora_down.weight", ".lora_up.weight", ".dora_scale"), "DoRA"),
])
def test_lycoris_and_dora_are_refused_in_one_line(tmp_path, suffixes, family):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "lycoris.safetensors"
    save_file({key + suffix: torch.ones(4, 4) for suffix in suffixes}, path)
    with pytest.raises(LoraschedError, match=f"^{path}: {family} weights are not supported"):
        open_lora(path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0 and f"refused: {family}" in result.output


def test_cli_merge_with_format_diffusers_then_inspect(tiny_base, kohya_pair, tmp_path):
    out = tmp_path / "merged.safetensors"
    args = ["merge", "--base", tiny_base, "--subject", kohya_pair[0], "--style", kohya_pair[1], "--output", out,
            "--format", "diffusers"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    from safetensors import safe_open

    with safe_open(str(out), "pt") as handle:
        assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in handle.keys())
        assert handle.metadata()["lorasched.tensor_format"] == "diffusers"
    shown = CliRunner().invoke(main, ["inspect", str(out)])
    assert shown.exit_code == 0 and "method      klora" in shown.output
    raw = CliRunner().invoke(main, ["inspect", str(kohya_pair[0])])
    assert raw.exit_code == 0
    assert "format        kohya, diffusers names" in raw.output and "text encoder  text encoder:" in raw.output
    assert "alphas        2×" in raw.output
