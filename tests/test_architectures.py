"""SDXL, FLUX.1 and SD3 end to end on tiny pipelines built in code: merge -> replay equals the online K-LoRA rule,
and both export formats load with plain `load_lora_weights` as the same static mix."""

import pytest
import torch
from safetensors.torch import save_file

from calibration.online import OnlineRule
from lora_formats import DEFAULT_TARGETS, flux_kohya_lora, kohya_lora, peft_lora
from merge import fileformat, rules
from merge.convert import merge, read_pair
from merge.errors import LoraschedError
from merge.lora import STYLE, SUBJECT
from merge.quiet import collected_loading_messages
from merge.replay import MODES, attach
from merge.schedule import Schedule
from tiny import ARCHITECTURES, generate

KLORA = rules.RuleOptions(pattern="s*")
STEPS = 7
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _sdxl_pair(pipe):
    """kohya with alphas; the subject adds LoCon convs and both text encoders, the style feed-forwards."""
    subject = peft_lora(pipe, "unet", DEFAULT_TARGETS + ("conv1", "conv2"), rank=4, seed=1)
    subject.update(peft_lora(pipe, "text_encoder", TEXT_TARGETS, rank=4, seed=3))
    subject.update(peft_lora(pipe, "text_encoder_2", TEXT_TARGETS, rank=4, seed=4))
    style = peft_lora(pipe, "unet", ("to_q", "to_k", "to_v", "ff.net.2", "conv1"), rank={"": 8}, seed=2)
    return kohya_lora(subject, alpha=2.0), kohya_lora(style, alpha=3.0)


def _flux_pair(pipe):
    """ai-toolkit/SimpleTuner (PEFT) subject over every block linear; kohya/BFL style with fused qkv and alphas."""
    targets = DEFAULT_TARGETS + ("add_q_proj", "add_k_proj", "add_v_proj", "ff.net.0.proj", "ff.net.2",
                                 "proj_mlp", "proj_out", "norm1.linear", "norm.linear")
    subject = peft_lora(pipe, "transformer", targets, rank={"to_q": 4, "": 6}, seed=1)
    return subject, flux_kohya_lora(pipe, rank=8, alpha=4.0, seed=2)


def _sd3_pair(pipe):
    targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    subject = peft_lora(pipe, "transformer", targets + ("ff.net.2",), rank=4, seed=1, dtype=torch.bfloat16)
    style = peft_lora(pipe, "transformer", targets + ("ff_context.net.2", "norm1.linear"), rank=8, seed=2,
                      dtype=torch.float16)
    return subject, style


PAIRS = {"sdxl": _sdxl_pair, "flux": _flux_pair, "sd3": _sd3_pair}
FORMATS = {"sdxl": ("kohya", "diffusers"), "flux": ("diffusers",), "sd3": ("diffusers",)}


@pytest.fixture(scope="module", params=list(PAIRS))
def world(request, tmp_path_factory):
    """A saved tiny base, a LoRA pair written in that architecture's trainer formats, and one merge per format."""
    architecture = request.param
    folder = tmp_path_factory.mktemp(architecture)
    pipe = ARCHITECTURES[architecture]()
    pipe.save_pretrained(folder / "base")
    paths = folder / "subject.safetensors", folder / "style.safetensors"
    for path, tensors in zip(paths, PAIRS[architecture](pipe)):
        save_file(tensors, path)
    base, subject, style = str(folder / "base"), *map(str, paths)
    files = {}
    for tensor_format in FORMATS[architecture]:
        files[tensor_format] = folder / f"{tensor_format}.safetensors"
        merge(base, subject, style, str(files[tensor_format]), "klora", KLORA, steps=10, tensor_format=tensor_format)
    pair = read_pair(base, subject, style)
    return architecture, pair, files


def fresh(architecture):
    pipe = ARCHITECTURES[architecture]().to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("mode", MODES)
def test_klora_replay_equals_online(world, mode):
    architecture, pair, files = world
    rule, _ = rules.build("klora", pair, KLORA)
    pipe = fresh(architecture)
    base = generate(pipe, STEPS)
    with OnlineRule(pipe, pair, rule):
        online = generate(pipe, STEPS)
    for path in files.values():
        handle = attach(pipe, path, mode=mode)
        replayed = generate(pipe, STEPS)
        handle.detach()
        assert (replayed - online).abs().max().item() < 1e-4, path.name
    assert (online - base).abs().max().item() > 1e-3
    switching = [n for n, phases in Schedule.from_json(fileformat.read(path).schedule_json).layers.items()
                 if len(phases) > 1]
    assert switching, "a schedule without switches would make the equality vacuous"


def test_selection_covers_every_both_adapted_linear(world):
    architecture, pair, _ = world
    both = pair.both_adapted
    kinds = {name.rsplit(".", 1)[-1] for name in both}
    expected = {"sdxl": {"to_q", "to_k", "to_v", "conv1"}, "flux": {"to_q", "to_k", "to_v", "add_q_proj", "0", "proj"},
                "sd3": {"to_q", "to_k", "to_v", "0", "add_q_proj", "to_add_out"}}[architecture]
    assert expected <= kinds
    assert all(pair.is_denoiser(name) for name in both)


@pytest.mark.parametrize("tensor_format", ["kohya", "diffusers"])
def test_plain_load_gives_the_static_mix(world, tensor_format):
    architecture, pair, files = world
    if tensor_format not in files:
        with pytest.raises(LoraschedError, match="--format kohya"):
            merge(*map(str, (files["diffusers"].parent / "base", pair.subject.path, pair.style.path,
                             files["diffusers"].parent / "k.safetensors")), "klora", KLORA, tensor_format="kohya")
        return
    path = files[tensor_format]
    schedule = Schedule.from_json(fileformat.read(path).schedule_json)
    pipe = fresh(architecture)
    with collected_loading_messages() as messages:
        pipe.load_lora_weights(str(path), adapter_name="plain")
    assert [m for m in messages if "key" in m.lower() and "No LoRA keys associated" not in m] == []
    for name in pair.module_names:
        component, _, module_path = name.partition(".")
        loaded = getattr(pipe, component).get_submodule(module_path).get_delta_weight("plain")
        expected = torch.zeros_like(loaded)
        for source, weight in zip((SUBJECT, STYLE), schedule.static_weights(name)):
            if name in pair.source(source).modules:
                expected += weight * pair.source(source).modules[name].delta().reshape(loaded.shape)
        assert torch.allclose(loaded, expected, rtol=1e-3, atol=1e-5), name


def test_both_formats_load_to_the_same_output(world):
    architecture, _, files = world
    outputs = []
    for path in files.values():
        pipe = fresh(architecture)
        pipe.load_lora_weights(str(path))
        outputs.append(generate(pipe, 4))
    assert all(torch.allclose(outputs[0], other, atol=1e-9) for other in outputs[1:])


def test_compatibility_metadata_names_the_architecture(world):
    architecture, _, files = world
    for path in files.values():
        metadata = fileformat.read(path).metadata
        expected = {"sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd3": "sd3"}[architecture]
        assert metadata["ss_base_model_version"] == expected
        assert metadata["modelspec.merged_from"] == "subject.safetensors, style.safetensors"
        assert "hook" in metadata["modelspec.usage_hint"]
