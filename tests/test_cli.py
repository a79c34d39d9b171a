"""`lorasched merge` / `inspect`: the happy path, and every bad input -> one line, exit code 2, no output file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]


def merge_args(base, subject, style, output, *extra):
    return ["merge", "--base", base, "--subject", subject, "--style", style, "--output", output, *extra]


def test_merge_then_inspect_prints_the_schedule(tiny_base, kohya_pair, tmp_path):
    out = tmp_path / "fused.safetensors"
    result = run(*merge_args(tiny_base, *kohya_pair, out, "--method", "klora", "--steps", "20"))
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout
    shown = run("inspect", out)
    assert shown.exit_code == 0, shown.output
    assert "method      klora" in shown.stdout
    assert "subject.safetensors" in shown.stdout and "style.safetensors" in shown.stdout
    assert "→ style at p=" in shown.stdout and "(step " in shown.stdout
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in shown.stdout


@pytest.fixture(scope="module")
def bad_files(tiny_base, kohya_pair, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    subject = kohya_pair[0]
    good = load_file(str(subject))
    files = {}
    files["missing"] = folder / "missing.safetensors"
    files["corrupt"] = folder / "corrupt.safetensors"
    files["corrupt"].write_bytes(os.urandom(2048))
    files["truncated"] = folder / "truncated.safetensors"
    files["truncated"].write_bytes(subject.read_bytes()[: subject.stat().st_size // 2])
    other_base = {}
    for key, tensor in good.items():  # same names, but a cross-attention width of 768 (an SD1.5 LoRA)
        if "attn2_to_k.lora_down" in key or "attn2_to_v.lora_down" in key:
            tensor = torch.randn(tensor.shape[0], 768)
        other_base[key] = tensor
    files["other-base"] = folder / "other_base.safetensors"
    save_file(other_base, files["other-base"])
    files["not-a-lora"] = folder / "unet_weights.safetensors"
    save_file({"conv_in.weight": torch.randn(4, 4, 3, 3), "conv_in.bias": torch.randn(4)}, files["not-a-lora"])
    nan = dict(good)
    key = next(k for k in nan if k.endswith("lora_up.weight"))
    nan[key] = nan[key].clone()
    nan[key][0, 0] = float("nan")
    files["nan"] = folder / "nan.safetensors"
    save_file(nan, files["nan"])
    files["dora"] = folder / "dora.safetensors"
    save_file({**good, **{key.replace(".lora_down.weight", ".dora_scale"): torch.ones(1, 4) for key in good
                          if key.endswith(".lora_down.weight")}}, files["dora"])
    files["pickle"] = folder / "weights.bin"
    torch.save(good, files["pickle"])
    return files


@pytest.mark.parametrize(
    "case, problem",
    [
        ("missing", "no such file"),
        ("corrupt", "not a readable safetensors file"),
        ("truncated", "not a readable safetensors file"),
        ("other-base", "does not fit this base model"),
        ("not-a-lora", "holds no LoRA factors"),
        ("nan", "NaN"),
        ("dora", "DoRA weights (`…dora_scale…`) cannot be merged"),
        ("pickle", "pickle"),
    ],
)
def test_bad_subject_file_is_one_line_exit_2_no_output(tiny_base, kohya_pair, bad_files, tmp_path, case, problem):
    out = tmp_path / "out.safetensors"
    result = run(*merge_args(tiny_base, bad_files[case], kohya_pair[1], out))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(bad_files[case]) in lines[0] and problem in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_output_equal_to_an_input_is_refused(tiny_base, kohya_pair):
    subject, style = kohya_pair
    before = subject.read_bytes()
    result = run(*merge_args(tiny_base, subject, style, subject))
    assert result.exit_code == 2 and "output path is one of the inputs" in result.stderr
    assert subject.read_bytes() == before


def test_inspect_describes_a_plain_lora(kohya_pair):
    result = run("inspect", kohya_pair[0])
    assert result.exit_code == 0 and "not a lorasched file" in result.stdout
    assert "format        kohya, diffusers names" in result.stdout and "ranks         4×" in result.stdout


def test_real_process_prints_exactly_one_line_on_bad_input(tiny_base, kohya_pair, bad_files, tmp_path):
    """No library noise or traceback reaches the terminal of a user who gave a bad file."""
    out = tmp_path / "out.safetensors"
    args = merge_args(tiny_base, bad_files["other-base"], kohya_pair[1], out)
    proc = subprocess.run([sys.executable, "-m", "lorasched", *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and not out.exists()


def test_the_installed_name_is_lorasched_even_beside_a_users_merge_py(tmp_path):
    """Only `lorasched` is imported by name: a user's own `merge.py` (or `cli.py`) cannot shadow our modules, and
    importing the package changes no environment variable."""
    (tmp_path / "merge.py").write_text("raise SystemExit('the user module was imported')\n")
    (tmp_path / "cli.py").write_text("raise SystemExit('the user module was imported')\n")
    code = ("import os; before = dict(os.environ); import lorasched; from lorasched import attach, LoraschedError; "
            "import lorasched.cli, lorasched.convert; assert dict(os.environ) == before; print(attach.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "lorasched.merge.replay"
    script = Path(sys.executable).with_name("lorasched")
    shown = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert shown.returncode == 0 and "merge" in shown.stdout and "inspect" in shown.stdout
