"""np-lora, switch, windows and blocks (docs/methods.md): hand-computed cases on small matrices, then merge ->
inspect -> replay equal to a direct per-step application of the method on tiny SD and FLUX pipelines."""

from __future__ import annotations

import pytest
import torch
from conftest import generate as generate_sd
from conftest import run
from lorasched.calibration.online import OnlineRule
from lorasched.merge import fileformat, rules
from lorasched.merge.errors import LoraschedError
from lorasched.merge.lora import STATIC, STYLE, SUBJECT, LoraFile, LoraModule, LoraSet, Source
from lorasched.merge.lora_io import read_pair
from lorasched.merge.names import get_module
from lorasched.merge.replay import MODES, attach
from lorasched.merge.rules import blocks, lora_switch, np_lora, windows
from lorasched.tiny import ARCHITECTURES, generate
from safetensors.torch import save_file

CASES = {
    "np-lora": ("--mu", "0.5"),
    "switch": ("--period", "2"),
    "windows": ("--windows", "0.6,0.3"),
    "blocks": ("--blocks", "subject=unet.down_blocks.*,style=unet.up_blocks.*"),
}


def module(rows: int, cols: int, rank: int, seed: int, scale: float = 1.0) -> LoraModule:
    generator = torch.Generator().manual_seed(seed)
    return LoraModule(torch.randn(rank, cols, generator=generator), torch.randn(rows, rank, generator=generator), scale)


def three(modules: dict[str, tuple]) -> LoraSet:
    """Sources subject (0), style (1), static (2), each adapting the layers its entry in `modules` names."""
    files = [LoraFile(f"{role}.safetensors", role, torch.float32,
                      {name: module(4, 4, 1, seed) for name, (roles, seed) in modules.items() if role in roles})
             for role in (SUBJECT, STYLE, STATIC)]
    return LoraSet(tuple(Source(file, role) for file, role in zip(files, (SUBJECT, STYLE, STATIC))), "unet")


def test_switch_takes_turns_every_period_on_the_progress_axis():
    loras = three({"unet.both": ((SUBJECT, STYLE), 0), "unet.subject_only": ((SUBJECT,), 1)})
    rule = lora_switch.LoraSwitchRule.of(loras, period=2, steps=10)
    assert rule.phases("unet.both") == [(0.0, (0,)), (0.2, (1,)), (0.4, (0,)), (0.6, (1,)), (0.8, (0,))]
    assert rule.phases("unet.subject_only") == [(0.0, (0,)), (0.2, ()), (0.4, (0,)), (0.6, ()), (0.8, (0,))]
    assert [rule.choose("unet.both", n / 10) for n in range(10)] == [(0,), (0,), (1,), (1,), (0,), (0,), (1,), (1,),
                                                                     (0,), (0,)]
    assert lora_switch.LoraSwitchRule.of(loras, period=3, steps=7).phases("unet.both") == [
        (0.0, (0,)), (3 / 7, (1,)), (6 / 7, (0,))]


@pytest.mark.parametrize("subject_end, style_start, expected", [
    (0.6, 0.3, [(0.0, (0,)), (0.3, (0, 1)), (0.6, (1,))]),  # overlap: both
    (0.3, 0.5, [(0.0, (0,)), (0.3, ()), (0.5, (1,))]),  # gap: neither
    (1.0, 0.0, [(0.0, (0, 1))]),  # both throughout
])
def test_windows_open_and_close_each_role(subject_end, style_start, expected):
    loras = three({"unet.m": ((SUBJECT, STYLE), 0)})
    rule = windows.WindowsRule.of(loras, subject_end, style_start)
    assert rule.phases("unet.m") == expected
    assert all(rule.choose("unet.m", p) == [s for start, s in expected if start <= p][-1]
               for p in (n / 40 for n in range(40)))


def test_blocks_send_named_blocks_to_one_role_and_keep_both_elsewhere():
    names = ("unet.up_blocks.0.attentions.0.x", "unet.up_blocks.0.attentions.1.x", "unet.down_blocks.1.x")
    files = [LoraFile(f"{r}.safetensors", r, torch.float32, {n: module(4, 4, 1, i) for i, n in enumerate(names)})
             for r in (SUBJECT, STYLE)]
    loras = LoraSet.pair(*files, denoiser="unet", pipeline_class="StableDiffusionXLPipeline")
    rule = blocks.select(loras, blocks.block_globs(loras, None))
    assert [rule.phases(n) for n in names] == [[(0.0, (0,))], [(0.0, (1,))], [(0.0, (0, 1))]]
    assert blocks.parse_blocks("subject=a*,style=b*,style=c*") == {SUBJECT: ("a*",), STYLE: ("b*", "c*")}
    sd = LoraSet.pair(*files, denoiser="unet")
    with pytest.raises(LoraschedError, match="no established content/style block split"):
        blocks.block_globs(sd, None)


def dense_np_lora(content: LoraModule, styles: list[LoraModule], mu: float, k: int | None) -> torch.Tensor:
    """The paper's formula on dense matrices: ΔW_s + ΔW_c (I − μ/(1+μ) V_k V_kᵀ), V_k from a dense SVD of ΔW_s."""
    style = sum(s.delta() for s in styles)
    _, values, right = torch.linalg.svd(style)
    rank = int((values > 1e-10 * values[0]).sum())
    v = right[: rank if k is None else k].T
    return style + content.delta() @ (torch.eye(v.shape[0], dtype=torch.float64) - mu / (1 + mu) * v @ v.T)


@pytest.mark.parametrize("mu, k, style_ranks", [(0.5, None, (3,)), (2.0, 2, (3,)), (0.5, None, (2, 3)),
                                                 (0.0, None, (3,))])
def test_np_lora_equals_the_formula_on_a_dense_reference(mu, k, style_ranks):
    content = module(9, 12, 4, seed=1, scale=0.7)
    styles = [module(9, 12, rank, seed=2 + i, scale=1.3) for i, rank in enumerate(style_ranks)]
    files = [LoraFile("c.safetensors", "c", torch.float32, {"unet.m": content})] + [
        LoraFile(f"s{i}.safetensors", f"s{i}", torch.float32, {"unet.m": s}) for i, s in enumerate(styles)]
    loras = LoraSet((Source(files[0], SUBJECT), *(Source(f, STYLE) for f in files[1:])), "unet")
    projected = np_lora.project(loras, mu, k)
    merged = sum(source.lora.modules["unet.m"].delta() for source in projected.sources)
    expected = dense_np_lora(content, styles, mu, k)
    assert torch.allclose(merged, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert projected.sources[0].lora.modules["unet.m"].rank == 4  # still a rank-r_c factor
    assert all(projected.sources[i].lora.modules["unet.m"] is styles[i - 1] for i in range(1, len(files)))


def test_np_lora_projects_conv_kernels_over_their_flattened_input():
    generator = torch.Generator().manual_seed(0)
    content = LoraModule(torch.randn(2, 3, 3, 3, generator=generator), torch.randn(5, 2, 1, 1, generator=generator), 1)
    style = LoraModule(torch.randn(4, 3, 3, 3, generator=generator), torch.randn(5, 4, 1, 1, generator=generator), 1)
    files = [LoraFile(n, n, torch.float32, {"unet.c": m}) for n, m in (("c", content), ("s", style))]
    projected = np_lora.project(LoraSet.pair(*files, denoiser="unet"))
    down = projected.sources[0].lora.modules["unet.c"].down
    assert down.shape == (2, 3, 3, 3)
    merged = projected.sources[0].lora.modules["unet.c"].delta() + style.delta()
    assert torch.allclose(merged, dense_np_lora(content, [style], 0.5, None), atol=1e-5)


@pytest.fixture(scope="module")
def sd_files(tiny_base, kohya_pair, tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("methods")
    files = {}
    for method, options in CASES.items():
        out = folder / f"{method}.safetensors"
        result = run("merge", "--base", tiny_base, "--subject", kohya_pair[0], "--style", kohya_pair[1], "--method",
                     method, *options, "--steps", 10, "-o", out)
        assert result.exit_code == 0, result.output
        files[method] = out
    return files


def reference(method: str, loras: LoraSet, options: tuple[str, ...]):
    """The method's rule, built straight from its definition module (and np-lora's projected LoRAs)."""
    value = options[1]
    if method == "np-lora":
        projected = np_lora.project(loras, float(value))
        return projected, rules.direct.DirectRule.of(projected)
    if method == "switch":
        return loras, lora_switch.LoraSwitchRule.of(loras, int(value), 10)
    if method == "windows":
        return loras, windows.WindowsRule.of(loras, *map(float, value.split(",")))
    return loras, blocks.select(loras, blocks.parse_blocks(value))


@pytest.mark.parametrize("method", list(CASES))
def test_each_method_inspects_and_replays_as_its_direct_per_step_application(sd_files, pair, pipe64, method):
    path = sd_files[method]
    shown = run("inspect", path)
    assert shown.exit_code == 0 and f"method      {method}" in shown.output
    applied, rule = reference(method, pair, CASES[method])
    schedule = fileformat.read(path).schedule
    switching = sum(len(phases) > 1 for phases in schedule.layers.values())
    assert (switching > 0) == (method in ("switch", "windows"))
    assert_replays_as_applied(pipe64, path, applied, rule, generate_sd, (10, 7))


def assert_replays_as_applied(pipe, path, applied: LoraSet, rule, make, step_counts) -> None:
    """`attach(path)` equals the rule applied online at every step (≤ 1e-4 on latents), in both modes, at each
    step count; and the LoRAs really change the result."""
    for steps in step_counts:
        with OnlineRule(pipe, applied, rule):
            online = make(pipe, steps)
        for mode in MODES:
            with attach(pipe, path, mode=mode):
                replayed = make(pipe, steps)
            assert (replayed - online).abs().max().item() < 1e-4, (steps, mode)
        assert (online - make(pipe, steps)).abs().max().item() > 1e-4


def test_a_layer_no_lora_is_ever_active_in_is_left_out(tiny_base, kohya_pair, pair, pipe64, tmp_path):
    """windows 0.7,1: the style never opens, so the layers only the style adapts (ff.net.2) carry nothing; the file
    leaves them out, and the rest replays as the per-step application."""
    out = tmp_path / "subject-only.safetensors"
    assert run("merge", "--base", tiny_base, "--subject", kohya_pair[0], "--style", kohya_pair[1], "--method",
               "windows", "--windows", "0.7,1", "--steps", 10, "-o", out).exit_code == 0
    layers = fileformat.read(out).schedule.layers
    assert layers and not any(name.endswith("ff.net.2") and name.startswith("unet.") for name in layers)
    assert_replays_as_applied(pipe64, out, pair, windows.WindowsRule.of(pair, 0.7, 1.0), generate_sd, (10,))


def test_np_lora_file_loads_as_the_formula_in_a_plain_loader(sd_files, tiny_base, pair):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    pipe.load_lora_weights(str(sd_files["np-lora"]), adapter_name="plain")
    for name in pair.decided:
        content, style = (source.lora.modules[name] for source in pair.sources)
        expected = dense_np_lora(content, [style], 0.5, None)
        loaded = get_module(pipe, name).get_delta_weight("plain").double().reshape(expected.shape)
        assert torch.allclose(loaded, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()), name


@pytest.mark.parametrize("method", ["switch", "windows", "blocks", "np-lora"])
def test_each_method_replays_on_flux(method, tmp_path):
    from lora_formats import DEFAULT_TARGETS, peft_lora

    pipe = ARCHITECTURES["flux"]()
    pipe.save_pretrained(tmp_path / "base")
    paths = [tmp_path / "subject.safetensors", tmp_path / "style.safetensors"]
    save_file(peft_lora(pipe, "transformer", DEFAULT_TARGETS, rank=4, seed=1), paths[0])
    save_file(peft_lora(pipe, "transformer", DEFAULT_TARGETS + ("proj_mlp",), rank=6, seed=2), paths[1])
    options = {"switch": ("--period", "3"), "windows": ("--windows", "0.5,0.5"), "np-lora": ("--mu", "1"),
               "blocks": ("--blocks", "subject=transformer.transformer_blocks.*,"
                                      "style=transformer.single_transformer_blocks.*")}[method]
    out = tmp_path / f"{method}.safetensors"
    result = run("merge", "--base", tmp_path / "base", "--subject", paths[0], "--style", paths[1], "--method", method,
                 *options, "--steps", 10, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"method      {method}" in run("inspect", out).output
    applied, rule = reference(method, read_pair(str(tmp_path / "base"), *map(str, paths)), options)
    pipe = pipe.to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    assert_replays_as_applied(pipe, out, applied, rule, generate, (6, 10))
