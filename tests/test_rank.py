"""`--rank`: each source's delta per layer re-factorised by truncated SVD from its factors; the file shrinks, each
layer's recorded error is what its discarded singular values predict, and a request no layer exceeds changes
nothing."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run
from lorasched.merge import rank, schema
from lorasched.merge.lora import LoraModule
from lorasched.tiny import random_kohya_lora
from safetensors.torch import save_file

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2")


@pytest.fixture(scope="module")
def four(tiny_base, tmp_path_factory):
    """Two subjects, a style and a static LoRA, all rank 64 (above the tiny layers' width, so every layer is
    re-factorised at 32)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    folder = tmp_path_factory.mktemp("rank")
    paths = {}
    for seed, name in enumerate(("subject", "subject2", "style", "static"), start=20):
        paths[name] = folder / f"{name}.safetensors"
        save_file(random_kohya_lora(pipe, 64, 32.0, seed=seed, targets=TARGETS, text_encoder=True), paths[name])
    return paths


def _merge(tiny_base, four, out, *extra):
    result = run("merge", "--base", tiny_base, "--subject", four["subject"], "--subject", four["subject2"],
                 "--style", four["style"], "--lora", four["static"], "--method", "klora", "-o", out, *extra)
    assert result.exit_code == 0, result.output
    return schema.read(out, with_tensors=True)


def test_rank_32_halves_the_file_and_records_the_svd_error(tiny_base, four, tmp_path):
    full = _merge(tiny_base, four, tmp_path / "full.safetensors")
    (tmp_path / "again").mkdir()
    _merge(tiny_base, four, tmp_path / "again" / "full.safetensors", "--rank", 64)  # every layer within 64
    assert (tmp_path / "again" / "full.safetensors").read_bytes() == (tmp_path / "full.safetensors").read_bytes()
    half = _merge(tiny_base, four, tmp_path / "half.safetensors", "--rank", 32)
    ratio = (tmp_path / "half.safetensors").stat().st_size / (tmp_path / "full.safetensors").stat().st_size
    assert 0.45 < ratio < 0.6, ratio
    errors = half.params["rank"]["errors"]
    assert half.params["rank"]["request"] == "32" and errors
    checked = 0
    for name, record in half.modules.items():
        assert all(r <= 32 for r in record.ranks)
        before, after = full.factors(name), half.factors(name)
        for source, (down, up) in before.items():
            dense = up.double().flatten(1) @ down.double().flatten(1)
            values = torch.linalg.svdvals(dense)
            predicted = math.sqrt(float((values[32:] ** 2).sum() / (values**2).sum()))
            recorded = errors.get(name, [0.0] * len(record.ranks))[source]
            assert recorded == pytest.approx(predicted, abs=1e-5), (name, source)
            down32, up32 = after[source]
            kept = up32.double().flatten(1) @ down32.double().flatten(1)
            assert float((dense - kept).norm() / dense.norm()) == pytest.approx(predicted, abs=1e-5)
            checked += 1
    assert checked > 50
    inspected = run("inspect", tmp_path / "half.safetensors")
    assert inspected.exit_code == 0 and "rank        --rank 32:" in inspected.output


def test_a_rank_no_layer_exceeds_changes_nothing(tiny_base, kohya_pair, tmp_path):
    """kohya_pair is rank 4 and 8: --rank 8 keeps every factor, and the file is byte for byte the one without it."""
    for folder, extra in (("plain", ()), ("same", ("--rank", 8))):
        (tmp_path / folder).mkdir()
        result = run("merge", "--base", tiny_base, "--subject", kohya_pair[0], "--style", kohya_pair[1],
                     "-o", tmp_path / folder / "out.safetensors", *extra)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "same" / "out.safetensors").read_bytes() == (tmp_path / "plain" / "out.safetensors").read_bytes()


def test_energy_keeps_the_share_asked_for():
    generator = torch.Generator().manual_seed(0)
    module = LoraModule(torch.randn(16, 40, generator=generator), torch.randn(48, 16, generator=generator), 0.5)
    reduced, error = rank.truncated(module, rank.RankRequest.parse("energy:0.9"))
    dense = module.delta()
    values = torch.linalg.svdvals(dense)
    share = torch.cumsum(values**2, 0) / (values**2).sum()
    assert reduced.rank == int((share < 0.9).sum()) + 1 < 16
    assert error <= math.sqrt(0.1) and float((dense - reduced.delta()).norm() / dense.norm()) == pytest.approx(error)


@pytest.mark.parametrize("extra, problem", [
    (("--rank", 0), "--rank 0: need at least 1"),
    (("--rank", "energy:1.5"), "the energy must be in (0, 1]"),
    (("--rank", "energy:0"), "the energy must be in (0, 1]"),
    (("--rank", "lots"), "give a whole number"),
    (("--rank", 500), "--rank 500: above every layer's rank (the largest is 8)"),
    (("--rank", 2, "--max-error", 0.0), "above --max-error 0"),
    (("--max-error", 0.1), "--max-error 0.1: give a fraction in [0, 1], with --rank"),
])
def test_bad_rank_input_is_one_line_exit_2(tiny_base, kohya_pair, tmp_path, extra, problem):
    out = tmp_path / "out.safetensors"
    result = run("merge", "--base", tiny_base, "--subject", kohya_pair[0], "--style", kohya_pair[1], "-o", out,
                 *extra)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert problem in result.stderr, result.stderr
    assert not out.exists()
