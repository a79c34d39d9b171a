"""End to end on a tiny SD pipeline: merge -> file -> attach equals the online rule (methods.md) within 1e-4."""

import pytest
import torch

from lorasched.calibration.online import OnlineRule
from conftest import generate
from lorasched.merge import rules
from lorasched.convert import merge
from lorasched.merge.lora_io import read_pair
from lorasched.merge.fileformat import FormatError
from lorasched.merge.replay import ADAPTERS, MODES, attach

MERGE_STEPS = 10
CASES = {
    "klora-s": ("klora", rules.RuleOptions(pattern="s")),
    "klora-s*": ("klora", rules.RuleOptions(pattern="s*")),
    "est": ("est", rules.RuleOptions(beta=0.4)),
    "direct": ("direct", rules.RuleOptions()),
}


@pytest.fixture(scope="module")
def merged(tiny_base, kohya_pair, tmp_path_factory):
    subject, style = kohya_pair
    folder = tmp_path_factory.mktemp("merged")
    pair = read_pair(str(tiny_base), str(subject), str(style))
    files = {}
    for case, (method, options) in CASES.items():
        out = folder / f"{case}.safetensors"
        merge(str(tiny_base), str(subject), str(style), str(out), method, options, steps=MERGE_STEPS)
        files[case] = (out, rules.build(method, pair, options)[0])
    return pair, files


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("steps", [MERGE_STEPS, 7, 23])
def test_replay_equals_online_rule(merged, pipe64, case, steps, mode):
    pair, files = merged
    path, rule = files[case]
    with OnlineRule(pipe64, pair, rule):
        online = generate(pipe64, steps)
    handle = attach(pipe64, path, mode=mode)
    replayed = generate(pipe64, steps)
    handle.detach()
    assert (replayed - online).abs().max().item() < 1e-4


def test_schedules_really_switch(merged):
    """Guard against a vacuous equality: the K-LoRA file must change layers during denoising."""
    _, files = merged
    from lorasched.merge.fileformat import read
    from lorasched.merge.schedule import Schedule

    schedule = read(files["klora-s"][0]).schedule
    switching = [name for name, phases in schedule.layers.items() if len(phases) > 1]
    assert 5 < len(switching) < len(schedule.layers)


def test_replay_differs_from_plain_mix_and_from_base(merged, pipe64):
    _, files = merged
    base = generate(pipe64, MERGE_STEPS)
    handle = attach(pipe64, files["klora-s"][0])
    replayed = generate(pipe64, MERGE_STEPS)
    handle.detach()
    pipe64.load_lora_weights(str(files["klora-s"][0]))
    plain = generate(pipe64, MERGE_STEPS)
    assert (replayed - base).abs().max() > 1e-2
    assert (replayed - plain).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_replay_follows_another_scheduler(merged, pipe64, mode):
    from diffusers import DPMSolverMultistepScheduler

    pair, files = merged
    path, rule = files["klora-s*"]
    pipe64.scheduler = DPMSolverMultistepScheduler.from_config(pipe64.scheduler.config)
    with OnlineRule(pipe64, pair, rule):
        online = generate(pipe64, 9)
    handle = attach(pipe64, path, mode=mode)
    replayed = generate(pipe64, 9)
    handle.detach()
    assert (replayed - online).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_detach_restores_the_pipeline(merged, pipe64, mode):
    _, files = merged
    before = generate(pipe64, 5)
    weights = {k: v.clone() for k, v in pipe64.unet.state_dict().items()}
    handle = attach(pipe64, files["klora-s"][0], mode=mode)
    generate(pipe64, 5)
    handle.detach()
    assert torch.equal(generate(pipe64, 5), before)
    assert all(torch.equal(v, weights[k]) for k, v in pipe64.unet.state_dict().items())
    assert not any(name in ADAPTERS.values() for names in pipe64.get_list_adapters().values() for name in names)


def test_attach_refuses_a_file_whose_tensors_changed(merged, pipe64, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = merged[1]["klora-s"][0]
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key] = tensors[key] * 1.01
    tampered = tmp_path / "tampered.safetensors"
    save_file(tensors, tampered, metadata=metadata)
    with pytest.raises(FormatError, match="tensor hash"):
        attach(pipe64, tampered)


def test_fused_replay_keeps_bf16_weights_free_of_drift(merged, tiny_base):
    """Many switches in a low-precision pipeline: every re-merge starts from the exact original weight."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    handle = attach(pipe, merged[1]["klora-s*"][0])
    for p in [0.0, 0.3, 0.95] * 20:
        handle.apply(p)
    handle.apply(0.3)
    after_many = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    handle._segment = None
    for track in handle.tracks:
        track.current = None
    handle.apply(0.3)
    assert all(torch.equal(v, after_many[k]) for k, v in pipe.unet.state_dict().items())
    handle.detach()
    assert all(torch.equal(v, original[k]) for k, v in pipe.unet.state_dict().items())
