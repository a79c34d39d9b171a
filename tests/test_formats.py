"""Every input layout, written by the tests from a tiny pipeline's modules, is read as the ΔW the file means:
ΔW = alpha / r · up · down per module, fused qkv split by rows, in the file's own dtype; kinds that are no fixed
low-rank delta (DoRA, OFT, (IA)³, GLoRA, full diffs) are refused (LyCORIS LoKr/LoHa: tests/test_lycoris.py)."""

import re

import pytest
import torch
from click.testing import CliRunner
from lora_formats import (
    DEFAULT_TARGETS,
    attn_procs_lora,
    flux_kohya_lora,
    kohya_lora,
    peft_lora,
    sgm_kohya_lora,
    targets_of,
    xlabs_flux_lora,
)
from lorasched.cli import main
from lorasched.convert import merge
from lorasched.merge import fileformat
from lorasched.merge.anatomy import inspect_lora
from lorasched.merge.base import load_skeleton
from lorasched.merge.errors import LoraschedError
from lorasched.merge.lora_io import open_lora, read_lora
from lorasched.tiny import ARCHITECTURES
from safetensors.torch import save_file

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
    ((".lora_down.weight", ".lora_up.weight", ".dora_scale"), "DoRA"),
    ((".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"), "DoRA (PEFT)"),
    ((".oft_blocks", ".alpha"), "OFT/BOFT"),
    ((".weight", ".on_input"), "(IA)³"),
    ((".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight"), "GLoRA"),
    ((".diff", ".diff_b"), "a full-weight difference"),
])
def test_kinds_that_are_no_fixed_low_rank_delta_are_refused_in_one_line(tmp_path, suffixes, family):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "lycoris.safetensors"
    save_file({key + suffix: torch.ones(4, 4) for suffix in suffixes}, path)
    with pytest.raises(LoraschedError, match=f"^{re.escape(str(path))}: {re.escape(family)} weights .* cannot be "
                                             "merged: "):
        open_lora(path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0 and f"refused: {family}" in result.output


def test_cli_merge_with_format_diffusers_on_sd_is_refused_in_one_line(tiny_base, kohya_pair, tmp_path):
    """PEFT names for SD UNet attention load in diffusers only (ComfyUI 0.3 maps them under old processor names,
    A1111 and kohya not at all); the kohya default loads everywhere, diffusers included."""
    out = tmp_path / "merged.safetensors"
    args = ["merge", "--base", tiny_base, "--subject", kohya_pair[0], "--style", kohya_pair[1], "--output", out,
            "--format", "diffusers"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2 and result.stderr.startswith("error: --format diffusers: ComfyUI, A1111 and kohya")
    assert not out.exists()
    raw = CliRunner().invoke(main, ["inspect", str(kohya_pair[0])])
    assert raw.exit_code == 0
    assert "format        kohya, diffusers names" in raw.output and "text encoder  text encoder:" in raw.output
    assert "alphas        2×" in raw.output


TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TINY_UNET = "unknown UNet (cross-attention width 32)"


@pytest.fixture(scope="module")
def pipes(sd_pipe, flux):
    return {"sd": sd_pipe, "sdxl": ARCHITECTURES["sdxl"](), "flux": flux[0]}


def _sd(pipes, **kwargs):
    return peft_lora(pipes["sd"], "unet", DEFAULT_TARGETS + CONVS, seed=1, **kwargs)


def _sdxl(pipes):
    pipe = pipes["sdxl"]
    peft = peft_lora(pipe, "unet", ("to_q", "conv1", "downsamplers.0.conv"), rank=4, seed=1)
    peft.update(peft_lora(pipe, "text_encoder", TEXT_TARGETS, rank=4, seed=2))
    peft.update(peft_lora(pipe, "text_encoder_2", TEXT_TARGETS[:2], rank=4, seed=3))
    return peft


def _prefixed(peft, prefix):
    """The pipeline-level file saved from the bare UNet (no `unet.`), optionally inside a PEFT wrapper prefix."""
    return {prefix + key.removeprefix("unet."): value for key, value in peft.items()}


def _modules(pipes, architecture, component, suffixes):
    return len(targets_of(pipes[architecture], component, suffixes))


# name: (writer, expected `lorasched inspect` fields); {n}: modules the writer adapted (counted on the model),
# {f}: their factor tensors. FLUX counts are by hand: 1 double block (4 kohya / 4 XLabs stems), 2 single blocks.
INSPECT_CASES = {
    "kohya with alpha": (lambda p: kohya_lora(_sd(p, rank=4), 2.0), {
        "format": "kohya, diffusers names", "architecture": TINY_UNET, "ranks": "4×{n}",
        "alphas": "2×{n} (kohya .alpha keys)", "dtype": "float32×{f}", "text encoder": "none"}),
    "kohya without alpha": (lambda p: kohya_lora(_sd(p, rank=8), None), {
        "format": "kohya, diffusers names", "ranks": "8×{n}", "alphas": "none (alpha = rank, scale 1)"}),
    "kohya SDXL SGM names": (lambda p: sgm_kohya_lora(_sdxl(p), 1.0, p["sdxl"].unet.config), {
        "format": "kohya, SGM/LDM names", "architecture": "SDXL", "ranks": "4×{n}",
        "alphas": "1×{n} (kohya .alpha keys)",
        "text encoder": "text encoder: 8 modules, text encoder 2: 4 modules"}),
    "diffusers/PEFT fp16": (lambda p: _sd(p, rank=4, dtype=torch.float16), {
        "format": "diffusers/PEFT (ai-toolkit, SimpleTuner)", "architecture": TINY_UNET, "dtype": "float16×{f}"}),
    "denoiser-relative bf16": (lambda p: _prefixed(_sd(p, rank=4, dtype=torch.bfloat16), ""), {
        "format": "diffusers/PEFT, denoiser-relative (no component prefix)", "dtype": "bfloat16×{f}"}),
    "raw PEFT": (lambda p: _prefixed(_sd(p, rank=4), "base_model.model."), {
        "format": "raw PEFT adapter (base_model.model.…)", "modules": "{n}"}),
    "old attention processors": (lambda p: attn_procs_lora(p["sd"], rank=4), {
        "format": "diffusers attention processors (old)", "architecture": TINY_UNET, "ranks": "4×{n}",
        "alphas": "none (alpha = rank, scale 1)"}),
    "FLUX kohya/BFL": (lambda p: flux_kohya_lora(p["flux"], rank=4, alpha=2.0), {
        "format": "kohya, BFL FLUX names (fused qkv)", "architecture": "FLUX.1", "modules": "6", "ranks": "4×6",
        "alphas": "2×6 (kohya .alpha keys)", "dtype": "float32×12", "text encoder": "none"}),
    "XLabs FLUX": (lambda p: xlabs_flux_lora(p["flux"], rank=4), {
        "format": "XLabs FLUX", "architecture": "FLUX.1", "modules": "4", "ranks": "4×4",
        "alphas": "none (alpha = rank, scale 1)", "dtype": "float32×8"}),
    "ai-toolkit FLUX": (lambda p: peft_lora(p["flux"], "transformer", ("to_q", "proj_mlp", "norm.linear", "ff.net.2"),
                                            rank={"to_q": 2, "proj_mlp": 8, "": 4}, dtype=torch.bfloat16), {
        "format": "diffusers/PEFT (ai-toolkit, SimpleTuner)", "architecture": "FLUX.1", "modules": "8",
        "ranks": "2×3, 4×3, 8×2", "alphas": "none (alpha = rank, scale 1)", "dtype": "bfloat16×16"}),
}
COUNTED = {  # the modules each SD/SDXL writer adapts, as (architecture, component, suffixes) parts
    "kohya with alpha": [("sd", "unet", DEFAULT_TARGETS + CONVS)],
    "kohya without alpha": [("sd", "unet", DEFAULT_TARGETS + CONVS)],
    "kohya SDXL SGM names": [("sdxl", "unet", ("to_q", "conv1", "downsamplers.0.conv")),
                             ("sdxl", "text_encoder", TEXT_TARGETS), ("sdxl", "text_encoder_2", TEXT_TARGETS[:2])],
    "diffusers/PEFT fp16": [("sd", "unet", DEFAULT_TARGETS + CONVS)],
    "denoiser-relative bf16": [("sd", "unet", DEFAULT_TARGETS + CONVS)],
    "raw PEFT": [("sd", "unet", DEFAULT_TARGETS + CONVS)],
    "old attention processors": [("sd", "unet", DEFAULT_TARGETS)],
}


def inspected(path) -> dict[str, str]:
    """`lorasched inspect` output as {field: value}."""
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    return {line[:14].strip(): line[14:] for line in result.output.splitlines()}


@pytest.mark.parametrize("case", list(INSPECT_CASES))
def test_inspect_describes_each_input_format(pipes, tmp_path, case):
    writer, expected = INSPECT_CASES[case]
    path = tmp_path / "lora.safetensors"
    save_file(writer(pipes), path)
    n = sum(_modules(pipes, *part) for part in COUNTED.get(case, []))
    fields = inspected(path)
    for field, value in expected.items():
        assert fields[field] == value.format(n=n, f=2 * n), field
    assert fields["modules"] == expected.get("modules", str(n)).format(n=n)
    assert fields["merge"].startswith("readable") and fields["metadata"] == "none"


@pytest.mark.parametrize("width, architecture", [
    (3072, "FLUX.1"), (1536, "SD3 (MMDiT)"), (2432, "SD3 (MMDiT)"),
    (64, "FLUX.1 or SD3 (double-stream blocks only, width 64)"),
])
def test_inspect_tells_flux_from_sd3_by_width_without_single_blocks(tmp_path, width, architecture):
    """Both name double-stream blocks `transformer.transformer_blocks.N.attn.*`; only FLUX.1 has single blocks."""
    stem = "transformer.transformer_blocks.0.attn.add_q_proj"
    path = tmp_path / "double-only.safetensors"
    save_file({f"{stem}.lora_A.weight": torch.zeros(2, width), f"{stem}.lora_B.weight": torch.zeros(width, 2)}, path)
    assert inspected(path)["architecture"] == architecture


def test_embeddings_riding_along_a_kohya_lora_are_left_out_of_the_merge(tiny_base, kohya_pair, tmp_path):
    """A kohya file with bundled embeddings (`bundle_emb.<token>.string_to_param.*`) merges as its LoRA part."""
    from safetensors.torch import load_file

    tensors = load_file(str(kohya_pair[0])) | {"bundle_emb.sks.string_to_param.*": torch.randn(1, 32)}
    path = tmp_path / "bundled.safetensors"
    save_file(tensors, path)
    assert "1 textual-inversion embedding tensor: bundle_emb.sks" in inspect_lora(path).layout
    assert "bundle_emb.sks.string_to_param.*" not in open_lora(path).tensors
    out = tmp_path / "out.safetensors"
    merge(str(tiny_base), str(path), str(kohya_pair[1]), str(out))
    assert fileformat.read(out).modules
