"""More than two LoRAs (docs/methods.md, "Several subjects or styles"): the selection rule on hand cases, the CLI,
format 2, replay against the online N-way rule, the static mix a plain loader gets, format-1 files, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import generate, run
from lorasched.calibration.online import OnlineRule
from lorasched.merge import fileformat, rules
from lorasched.merge.checks import LoraSpec, parse_lora
from lorasched.merge.errors import LoraschedError
from lorasched.merge.lora import STATIC, STYLE, SUBJECT, LoraFile, LoraModule, LoraSet, Source
from lorasched.merge.lora_io import read_pair, read_set
from lorasched.merge.names import get_module
from lorasched.merge.replay import MODES, attach
from lorasched.merge.rules import est
from lorasched.tiny import random_kohya_lora
from safetensors.torch import save_file

FORMAT_1 = Path(__file__).parent / "data" / "format1-klora-s-star.safetensors"


def scalar(value: float) -> LoraModule:
    """A 1 × 1 LoRA whose ΔW is `value`: its energy is value²."""
    return LoraModule(torch.tensor([[value]]), torch.tensor([[1.0]]), 1.0)


def test_each_role_sends_its_best_relative_score_to_the_switch():
    """Hand case: energies (layer a, layer b) subject1 (4, 1), subject2 (1, 9), style (1, 1).
    Relative to each subject's mean energy (2.5 and 5): layer a 1.6 vs 0.2 -> subject1, layer b 0.4 vs 1.8 ->
    subject2. γ of each pairing: trimmed mean of the energy ratios, (4 + 1) / 2 = 2.5 and (1 + 9) / 2 = 5.
    Switch, β = 0.5: a keeps subject1 while 4 / 2.5 = 1.6 > 1.5 p + 0.5, b keeps subject2 while 9 / 5 > 1.5 p + 0.5."""
    files = [LoraFile(f"{n}.safetensors", n, torch.float32, {"unet.a": scalar(a), "unet.b": scalar(b)})
             for n, a, b in (("c1", 2.0, 1.0), ("c2", 1.0, 3.0), ("s", 1.0, 1.0))]
    loras = LoraSet((Source(files[0], SUBJECT), Source(files[1], SUBJECT), Source(files[2], STYLE)), "unet")
    rule = est.build(loras, beta=0.5)
    assert rule.norms == (2.5, 5.0, 1.0)
    assert rule.gammas == {(0, 2): 2.5, (1, 2): 5.0}
    assert rule.winners("unet.a") == (0, 2) and rule.winners("unet.b") == (1, 2)
    assert rule.phases("unet.a") == [(0.0, (0,)), (pytest.approx(1.1 / 1.5), (2,))]
    assert rule.phases("unet.b") == [(0.0, (1,)), (pytest.approx(1.3 / 1.5), (2,))]
    for n in range(20):
        p = n / 20
        assert rule.choose("unet.a", p) == ((0,) if 1.6 > 1.5 * p + 0.5 else (2,))


def test_a_pair_is_exactly_the_two_lora_rule():
    files = [LoraFile(f"{n}.safetensors", n, torch.float32, {"unet.a": scalar(a), "unet.b": scalar(b)})
             for n, a, b in (("c", 2.0, 1.0), ("s", 1.0, 3.0))]
    rule = est.build(LoraSet.pair(*files, denoiser="unet"), beta=0.5)
    assert rule.norms is None and rule.gamma == pytest.approx(((4 / 1) + (1 / 9)) / 2)


@pytest.mark.parametrize("text, role, expected", [
    ("a.safetensors", SUBJECT, LoraSpec("a.safetensors", SUBJECT)),
    ("a.safetensors:0.8", STYLE, LoraSpec("a.safetensors", STYLE, 0.8)),
    ("C:/loras/a.safetensors", SUBJECT, LoraSpec("C:/loras/a.safetensors", SUBJECT)),
    ("detail.safetensors:1.5", None, LoraSpec("detail.safetensors", STATIC, 1.5)),
    ("style=b.safetensors:0.5", None, LoraSpec("b.safetensors", STYLE, 0.5)),
])
def test_lora_arguments_parse(text, role, expected):
    assert parse_lora(text, role) == expected


@pytest.mark.parametrize("text, role", [("style=a.safetensors", SUBJECT), ("subject=style=a.safetensors", None),
                                        ("a.safetensors:inf", SUBJECT)])
def test_lora_arguments_refuse_a_second_role_or_a_non_finite_strength(text, role):
    with pytest.raises(LoraschedError):
        parse_lora(text, role)


@pytest.fixture(scope="module")
def more_loras(tiny_base, kohya_pair, tmp_path_factory) -> dict[str, Path]:
    """Beside the conftest pair: a second subject, a second style and a static detail LoRA (feed-forward only)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    folder = tmp_path_factory.mktemp("more")
    paths = {"subject": kohya_pair[0], "style": kohya_pair[1], "subject2": folder / "subject2.safetensors",
             "style2": folder / "style2.safetensors", "detail": folder / "detail.safetensors"}
    save_file(random_kohya_lora(pipe, 2, 1.0, seed=11, targets=("to_q", "to_k", "to_v", "to_out.0")),
              paths["subject2"])
    save_file(random_kohya_lora(pipe, 4, 2.0, seed=12, targets=("to_k", "to_v", "ff.net.2"), text_encoder=True),
              paths["style2"])
    save_file(random_kohya_lora(pipe, 2, 0.5, seed=13, targets=("ff.net.2",)), paths["detail"])
    return paths


def nway_specs(paths) -> list[LoraSpec]:
    return [LoraSpec(str(paths["subject"]), SUBJECT), LoraSpec(str(paths["subject2"]), SUBJECT, 0.8),
            LoraSpec(str(paths["style"]), STYLE), LoraSpec(str(paths["style2"]), STYLE),
            LoraSpec(str(paths["detail"]), STATIC, 0.7)]


@pytest.fixture(scope="module")
def nway(tiny_base, more_loras, tmp_path_factory) -> tuple[Path, LoraSet]:
    out = tmp_path_factory.mktemp("nway") / "nway.safetensors"
    result = run("merge", "--base", tiny_base, "--subject", more_loras["subject"], "--subject",
                 f"{more_loras['subject2']}:0.8", "--style", more_loras["style"], "--style", more_loras["style2"],
                 "--lora", f"{more_loras['detail']}:0.7", "--method", "klora", "--pattern", "s*", "--steps", 10,
                 "-o", out)
    assert result.exit_code == 0, result.output
    return out, read_set(str(tiny_base), nway_specs(more_loras))


def test_merge_writes_format_2_with_every_source(nway, more_loras):
    path, loras = nway
    scheduled = fileformat.read(path, with_tensors=True)
    assert scheduled.metadata[fileformat.KEY_VERSION] == "2"
    assert [(s.file, s.role, s.strength) for s in scheduled.sources] == [
        ("subject.safetensors", SUBJECT, 1.0), ("subject2.safetensors", SUBJECT, 0.8),
        ("style.safetensors", STYLE, 1.0), ("style2.safetensors", STYLE, 1.0), ("detail.safetensors", STATIC, 0.7)]
    assert {(i, j) for i, j, _ in scheduled.params["gammas"]} == {(0, 2), (0, 3), (1, 2), (1, 3)}
    winners = {selection for phases in scheduled.schedule.layers.values() for _, selection in phases}
    assert {(0,), (1,), (2,), (3,)} & {tuple(i for i in s if i != 4) for s in winners} == {(0,), (1,), (2,), (3,)}, \
        "every subject and every style wins somewhere, so the test exercises the N-way rule"
    ff = [name for name in scheduled.schedule.layers if name.endswith("ff.net.2") and name.startswith("unet")]
    assert ff and all(4 in selection for name in ff for _, selection in scheduled.schedule.layers[name])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("steps", [10, 7])
def test_nway_replay_equals_the_online_nway_rule(nway, pipe64, steps, mode):
    path, loras = nway
    rule, _ = rules.build("klora", loras, rules.RuleOptions(pattern="s*"))
    with OnlineRule(pipe64, loras, rule):
        online = generate(pipe64, steps)
    with attach(pipe64, path, mode=mode):
        replayed = generate(pipe64, steps)
    assert (replayed - online).abs().max().item() < 1e-4
    assert (online - generate(pipe64, steps)).abs().max().item() > 1e-3


def test_plain_loading_gives_each_source_at_its_active_fraction(nway, tiny_base):
    from diffusers import StableDiffusionPipeline

    path, loras = nway
    schedule = fileformat.read(path).schedule
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    pipe.load_lora_weights(str(path), adapter_name="plain")
    for name in loras.module_names:
        loaded = get_module(pipe, name).get_delta_weight("plain").double()
        expected = torch.zeros_like(loaded)
        for source, weight in zip(loras.sources, schedule.static_weights(name, len(loras.sources))):
            if name in source.lora.modules:
                expected += weight * source.lora.modules[name].delta().reshape(loaded.shape)  # strength included
        assert torch.allclose(loaded, expected, rtol=1e-5, atol=1e-7), name


def test_inspect_and_heatmap_show_every_source(nway, tmp_path):
    path, _ = nway
    shown = run("inspect", path, "--png", tmp_path / "n.png")
    assert shown.exit_code == 0, shown.output
    for label in ("subject1", "subject2", "style1", "style2", "static"):
        assert f"\n{label} " in shown.output
    assert "strength 0.8" in shown.output and "static subject1/subject2/style1/style2/static" in shown.output
    assert (tmp_path / "n.png").stat().st_size > 1000


def test_a_format_1_file_still_reads_inspects_and_replays_as_before(tiny_base, kohya_pair, pipe64, tmp_path):
    """The golden file was written by lorasched 7b0e8e3 (format 1) from conftest's seeded tiny_base and kohya_pair,
    K-LoRA `s*`, 10 reference steps. Today's merge of the same pair makes the same schedule and factors, and both
    replay alike."""
    old = fileformat.read(FORMAT_1, with_tensors=True)
    assert old.metadata[fileformat.KEY_VERSION] == "1" and old.roles == (SUBJECT, STYLE)
    pair = read_pair(str(tiny_base), *map(str, kohya_pair))
    assert [s.sha256 for s in old.sources] == [pair.subject.sha256, pair.style.sha256]
    new_path = tmp_path / "new.safetensors"
    assert run("merge", "--base", tiny_base, "--subject", kohya_pair[0], "--style", kohya_pair[1], "--pattern", "s*",
               "--steps", 10, "-o", new_path).exit_code == 0
    new = fileformat.read(new_path, with_tensors=True)
    # Same phases and factors; the switch points may move in their last bits (today's scorer sums γ's L1 masses
    # tile by tile), so they are compared to 1e-9 and the factors to float32 rounding.
    assert old.schedule.layers.keys() == new.schedule.layers.keys()
    for name, phases in old.schedule.layers.items():
        assert [s for _, s in phases] == [s for _, s in new.schedule.layers[name]], name
        assert [p for p, _ in phases] == pytest.approx([p for p, _ in new.schedule.layers[name]], abs=1e-9), name
    assert old.tensors.keys() == new.tensors.keys()
    assert all(torch.allclose(old.tensors[k], new.tensors[k], rtol=1e-6, atol=0) for k in old.tensors)
    assert run("inspect", FORMAT_1).exit_code == 0
    rule = rules.from_file(old)
    with OnlineRule(pipe64, pair, rule):
        online = generate(pipe64, 7)
    for mode in MODES:
        with attach(pipe64, FORMAT_1, mode=mode):
            replayed_old = generate(pipe64, 7)
        with attach(pipe64, new_path, mode=mode):
            replayed_new = generate(pipe64, 7)
        assert (replayed_old - replayed_new).abs().max().item() < 1e-6
        assert (replayed_old - online).abs().max().item() < 1e-4


def test_roles_given_in_any_order_make_the_same_pair(tiny_base, kohya_pair, tmp_path):
    """`--style s --lora subject=c` is the pair (subject, style): sorted by role, one γ, as `--subject c --style s`."""
    ordered, shuffled = tmp_path / "ordered.safetensors", tmp_path / "shuffled.safetensors"
    assert run("merge", "--base", tiny_base, "--subject", kohya_pair[0], "--style", kohya_pair[1], "--steps", 10,
               "-o", ordered).exit_code == 0
    assert run("merge", "--base", tiny_base, "--style", kohya_pair[1], "--lora", f"subject={kohya_pair[0]}",
               "--steps", 10, "-o", shuffled).exit_code == 0
    first, second = fileformat.read(ordered), fileformat.read(shuffled)
    assert second.roles == (SUBJECT, STYLE) and "gamma" in second.params
    assert (first.params, first.schedule, first.sources) == (second.params, second.schedule, second.sources)
    assert first.metadata[fileformat.KEY_TENSOR_HASH] == second.metadata[fileformat.KEY_TENSOR_HASH]


def test_a_format_1_file_may_name_one_file_as_both_sources(tmp_path):
    """Format 1 never refused the same LoRA as subject and style; such files still read."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(FORMAT_1), "pt") as handle:
        metadata = dict(handle.metadata())
    sources = json.loads(metadata["lorasched.sources"])
    sources["style"]["sha256"] = sources["subject"]["sha256"]
    path = tmp_path / "twice.safetensors"
    save_file(load_file(str(FORMAT_1)), path, metadata={**metadata, "lorasched.sources": json.dumps(sources)})
    assert fileformat.read(path).sources[0].sha256 == fileformat.read(path).sources[1].sha256


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory) -> Path:
    """A LoRA for another base (tiny SDXL): it cannot be read onto the tiny SD base."""
    from lorasched.tiny import tiny_sdxl_pipeline

    path = tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors"
    save_file(random_kohya_lora(tiny_sdxl_pipeline(), 4, 4.0, seed=5), path)
    return path


def _refused(result, out: Path) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    return lines[0]


def test_bad_sets_are_refused_in_one_line_without_output(tiny_base, more_loras, sdxl_lora, tmp_path):
    out = tmp_path / "out.safetensors"
    subject, style = more_loras["subject"], more_loras["style"]
    copy = tmp_path / "copy.safetensors"
    shutil.copy(style, copy)
    cases = {
        "given twice": ("--subject", subject, "--style", subject),
        "same sha256": ("--subject", subject, "--style", style, "--style", copy),
        "role is given twice": ("--subject", f"style={subject}", "--style", style),
        "at least two": ("--subject", subject),
        "no style": ("--subject", subject, "--lora", style),
        str(sdxl_lora.name): ("--subject", subject, "--style", sdxl_lora),
        "--balance auto: works on one": ("--subject", subject, "--subject", more_loras["subject2"], "--style",
                                         style, "--balance", "auto"),
        "a static LoRA (--lora) would": ("--subject", subject, "--style", style, "--lora", more_loras["detail"],
                                         "--method", "feature-kl"),
        "--period: only --method switch": ("--subject", subject, "--style", style, "--period", 2),
        "unknown role 'lighting'": ("--subject", subject, "--style", style, "--lora", "lighting=x.safetensors"),
        "must be a finite, non-zero number": ("--subject", f"{subject}:0", "--style", style),
        "style.safetensors without one": ("--subject", subject, "--style", style, "--method", "switch",
                                          "--period", 30, "--steps", 30),
        "every denoiser layer without a LoRA": ("--subject", subject, "--style", style, "--method", "windows",
                                             "--windows", "0,1"),
        "matches no layer": ("--subject", subject, "--style", style, "--method", "blocks", "--blocks",
                             "subject=unet.nothing.*"),
    }
    for expected, args in cases.items():
        line = _refused(run("merge", "--base", tiny_base, *args, "-o", out), out)
        assert expected in line, (expected, line)


def test_verify_rebuilds_the_nway_rule_from_the_file_alone(nway, pipe64):
    from lorasched.evaluation.verify import verify

    path, _ = nway
    result = verify(pipe64, path, ["a photo of sks dog"], [3], 8, 7.5, 32)
    assert result.agreement == 1.0 and result.latent_max_abs_diff < 1e-4


def test_feature_kl_takes_the_lora_with_the_largest_balanced_divergence(tiny_base, more_loras, tmp_path):
    """Two subjects and two styles: each recorded decision is the argmax of D_k / b_k over the LoRAs of that
    layer (ties to the later), b_k from the balance run; the consensus replays, and verify on the calibration's
    own prompt and seed finds every decision."""
    from lorasched.calibration.aggregate import SOURCE_OF
    from lorasched.calibration.runner import read_log

    out = tmp_path / "fkl.safetensors"
    merged = run("merge", "--base", tiny_base, "--subject", more_loras["subject"], "--subject", more_loras["subject2"],
                 "--style", more_loras["style"], "--style", more_loras["style2"], "--method", "feature-kl",
                 "--prompts", "a photo of sks dog", "--seeds", "0", "--steps", 6, "--resolution", 32, "-o", out)
    assert merged.exit_code == 0, merged.output
    scheduled = fileformat.read(out)
    balances = scheduled.params["balances"]
    assert len(balances) == 4 and all(b > 0 for b in balances) and "gamma" not in scheduled.params
    log = read_log(tmp_path / "fkl.safetensors.calibration.jsonl")
    seen = set()
    for call in log.runs[0]["calls"]:
        for code, scores in zip(call["choices"], call["scores"]):
            balanced = [(d / balances[k], k) for k, d in enumerate(scores) if d is not None]
            best = max(value for value, _ in balanced)
            assert SOURCE_OF[code] == (max(k for value, k in balanced if value == best),)
            seen.add(code)
    assert len(seen) >= 3, "several LoRAs win somewhere, so the rule is exercised"
    sources = ("--subject", more_loras["subject"], "--subject", more_loras["subject2"], "--style",
               more_loras["style"], "--style", more_loras["style2"])
    checked = run("verify", out, "--base", tiny_base, "--prompts", "a photo of sks dog", "--seeds", "0",
                  "--steps", 6, "--resolution", 32, "--guidance", 7.5, *sources)
    assert checked.exit_code == 0, checked.output
    assert "agreement 100.0" in checked.stdout or "100.00%" in checked.stdout, checked.stdout


@pytest.mark.parametrize("label, edit", [
    ("a pairing without γ", lambda p: {**p, "gammas": p["gammas"][1:]}),
    ("norms for too few sources", lambda p: {**p, "norms": p["norms"][:2]}),
    ("a pairing of two subjects", lambda p: {**p, "gammas": [[0, 1, 1.0]] + p["gammas"][1:]}),
])
def test_format_2_params_are_checked_against_the_sources(nway, tmp_path, label, edit):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    path, _ = nway
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
    params = edit(json.loads(metadata["lorasched.params"]))
    broken = tmp_path / "broken.safetensors"
    save_file(load_file(str(path)), broken, metadata={**metadata, "lorasched.params": json.dumps(params)})
    result = run("inspect", broken)
    assert result.exit_code == 2 and "lorasched.params has gammas" in result.stderr, (label, result.output)
