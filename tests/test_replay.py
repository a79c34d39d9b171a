"""End to end on a tiny SD pipeline: merge -> file -> attach equals the online rule (methods.md) within 1e-4."""

import pytest
import torch
from conftest import generate
from lorasched.calibration.online import OnlineRule
from lorasched.convert import merge
from lorasched.merge import rules
from lorasched.merge.fileformat import FormatError
from lorasched.merge.lora_io import read_pair
from lorasched.merge.replay import ADAPTER_PREFIX, MODES, attach

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
    assert not any(name.startswith(ADAPTER_PREFIX) for names in pipe64.get_list_adapters().values() for name in names)


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

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    handle = attach(pipe, merged[1]["klora-s*"][0])
    for p in [0.0, 0.3, 0.95] * 20:
        handle.apply(p)
    handle.apply(0.3)
    after_many = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    handle.reset()
    handle.apply(0.3)
    assert all(torch.equal(v, after_many[k]) for k, v in pipe.unet.state_dict().items())
    handle.detach()
    assert all(torch.equal(v, original[k]) for k, v in pipe.unet.state_dict().items())


def _edited(path, tmp_path, edit) -> str:
    """A copy of `path` whose lorasched metadata went through `edit(modules, schedule)` (tensors untouched, so the
    tensor hash still matches: only the schema and the pipeline check can catch it)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
    modules, schedule = json.loads(metadata["lorasched.modules"]), json.loads(metadata["lorasched.schedule"])
    edit(modules, schedule)
    metadata["lorasched.modules"], metadata["lorasched.schedule"] = json.dumps(modules), json.dumps(schedule)
    out = tmp_path / "edited.safetensors"
    save_file(load_file(str(path)), out, metadata=metadata)
    return str(out)


def _rename_last(new_name):
    def edit(modules, schedule):
        last = sorted(modules)[-1]
        modules[new_name] = modules.pop(last)
        schedule["layers"][new_name] = schedule["layers"].pop(last)
    return edit


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("new_name,problem", [("unet.down_blocks.7.attentions.0.proj_in", "has no module"),
                                              ("unet.conv_in", "weight shape")])
def test_attach_on_a_file_that_does_not_fit_changes_nothing(merged, pipe64, kohya_pair, tmp_path, mode, new_name,
                                                             problem):
    """The misfit is the last module: every module before it was resolved (and, before attach became
    transactional, written) first. The user's own adapter stays loaded and active."""
    from lorasched import LoraschedError

    pipe64.load_lora_weights(str(kohya_pair[0]), adapter_name="mine")
    before, adapters = _state(pipe64), pipe64.get_list_adapters()
    bad = _edited(merged[1]["klora-s"][0], tmp_path, _rename_last(new_name))
    with pytest.raises(LoraschedError, match=problem) as error:
        attach(pipe64, bad, mode=mode)
    assert "edited.safetensors" in str(error.value) and new_name in str(error.value)
    after = _state(pipe64)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert pipe64.get_list_adapters() == adapters and pipe64.get_active_adapters() == ["mine"]


@pytest.mark.parametrize("mode", MODES)
def test_with_attach_restores_the_pipeline_on_exit(merged, pipe64, mode):
    before, plain = _state(pipe64), generate(pipe64, 5)
    with attach(pipe64, merged[1]["klora-s"][0], mode=mode) as handle:
        assert handle.attached
        replayed = generate(pipe64, 5)
    assert not handle.attached and (replayed - plain).abs().max() > 1e-3
    after = _state(pipe64)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(generate(pipe64, 5), plain)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")  # a second adapter: intended
@pytest.mark.parametrize("mode", MODES)
def test_detach_keeps_an_adapter_the_user_loaded_after_attach(merged, pipe64, kohya_pair, mode):
    handle = attach(pipe64, merged[1]["klora-s"][0], mode=mode)
    pipe64.load_lora_weights(str(kohya_pair[1]), adapter_name="mine")
    pipe64.set_adapters(["mine"])
    handle.detach()
    handle.detach()  # idempotent
    assert {name for names in pipe64.get_list_adapters().values() for name in names} == {"mine"}
    assert pipe64.get_active_adapters() == ["mine"]
    with_mine = generate(pipe64, 5)
    pipe64.delete_adapters(["mine"])
    assert (with_mine - generate(pipe64, 5)).abs().max() > 1e-3, "the user's adapter still acts"


def test_attach_refuses_a_schedule_that_uses_a_source_the_file_lacks(merged, pipe64, tmp_path):
    def edit(modules, schedule):
        name = next(n for n, record in modules.items() if 0 in record["ranks"])
        schedule["layers"][name] = [[0.0, [modules[name]["ranks"].index(0)]]]

    from lorasched import LoraschedError

    with pytest.raises(LoraschedError, match="whose factors it does not carry"):
        attach(pipe64, _edited(merged[1]["klora-s"][0], tmp_path, edit))


def test_a_second_attach_is_refused_until_the_first_detaches(merged, pipe64):
    """Two schedules on one pipeline would rewrite each other's layers: the second attach names the first file and
    changes nothing; after detach the pipeline takes a new one."""
    from lorasched import LoraschedError

    first, second = merged[1]["klora-s"][0], merged[1]["klora-s*"][0]
    state = {k: v.clone() for k, v in pipe64.unet.state_dict().items()}
    with attach(pipe64, first):
        replayed = {k: v.clone() for k, v in pipe64.unet.state_dict().items()}
        with pytest.raises(LoraschedError, match=f"already replays {first}; detach it first"):
            attach(pipe64, second)
        assert all(torch.equal(v, replayed[k]) for k, v in pipe64.unet.state_dict().items())
    with attach(pipe64, second):
        pass
    assert all(torch.equal(v, state[k]) for k, v in pipe64.unet.state_dict().items())
