"""The exported file: kohya tensors only, deterministic, atomic, and a plain load applies the static mix."""

import pytest
import torch
from lorasched.convert import merge
from lorasched.merge import fileformat, rules
from lorasched.merge.lora import STYLE, SUBJECT
from lorasched.merge.lora_io import read_pair
from lorasched.merge.names import get_module
from lorasched.merge.quiet import collected_loading_messages
from safetensors import safe_open


@pytest.fixture(scope="module")
def exported(tiny_base, kohya_pair, tmp_path_factory):
    subject, style = kohya_pair
    out = tmp_path_factory.mktemp("export") / "scheduled.safetensors"
    merge(str(tiny_base), str(subject), str(style), str(out), "klora", rules.RuleOptions(pattern="s*"), steps=20)
    return out


def test_tensors_are_kohya_lora_factors_only(exported):
    with safe_open(str(exported), "pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata()
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys)
    assert "lora_adapter_metadata" not in metadata
    assert all(k.startswith(("lorasched.", "ss_", "modelspec.")) for k in metadata)
    assert metadata["ss_base_model_version"] == "sd_v1"


def test_same_inputs_give_a_byte_identical_file(tiny_base, kohya_pair, exported, tmp_path):
    subject, style = kohya_pair
    again = tmp_path / exported.name
    merge(str(tiny_base), str(subject), str(style), str(again), "klora", rules.RuleOptions(pattern="s*"), steps=20)
    assert again.read_bytes() == exported.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [exported.name]  # no temp files left behind


def test_metadata_records_the_job(exported, kohya_pair):
    scheduled = fileformat.read(exported, with_tensors=True)
    assert scheduled.method == "klora"
    assert scheduled.params["pattern"] == "s*" and scheduled.params["steps"] == 20
    assert scheduled.params["gamma"] > 0
    assert [source.role for source in scheduled.sources] == [SUBJECT, STYLE]
    assert scheduled.sources[0].file == kohya_pair[0].name
    assert len(scheduled.sources[1].sha256) == 64
    both = [r for r in scheduled.modules.values() if r.scores is not None]
    assert both and all(len(r.scores) == 2 for r in both)


def test_plain_load_applies_the_static_mix_without_key_warnings(exported, tiny_base, kohya_pair):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    with collected_loading_messages() as messages:
        pipe.load_lora_weights(str(exported), adapter_name="plain")
    noisy = [m for m in messages if "key" in m.lower() and "No LoRA keys associated" not in m]
    assert noisy == []
    scheduled = fileformat.read(exported)
    schedule = scheduled.schedule
    pair = read_pair(str(tiny_base), *map(str, kohya_pair))
    checked = 0
    for name in pair.module_names:
        layer = get_module(pipe, name)
        loaded = layer.get_delta_weight("plain").double()
        c_subject, c_style = schedule.static_weights(name, 2)
        expected = torch.zeros_like(loaded)
        for source, weight in ((SUBJECT, c_subject), (STYLE, c_style)):
            if name in pair.source(source).modules:
                expected += weight * pair.source(source).modules[name].delta().reshape(loaded.shape)
        assert torch.allclose(loaded, expected, rtol=1e-5, atol=1e-7), name
        checked += 1
    assert checked == len(scheduled.modules)
    text_encoder = [n for n in schedule.layers if n.startswith("text_encoder.")]
    assert text_encoder and all(schedule.static_weights(n, 2) == (1.0, 1.0) for n in text_encoder)


def test_mixed_per_module_alphas_are_read_as_each_module_means(tiny_base, tmp_path):
    """kohya semantics: ΔW = alpha / r · up · down for each module, whatever the other modules' alphas."""
    from diffusers import StableDiffusionPipeline
    from lorasched.demo import random_kohya_lora
    from lorasched.merge.base import load_skeleton
    from lorasched.merge.lora_io import open_lora, read_lora
    from safetensors.torch import save_file

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    tensors = random_kohya_lora(pipe, 4, 2.0, seed=5)
    tensors.update(random_kohya_lora(pipe, 8, 8.0, seed=6, targets=("to_out.0",)))
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, path)
    lora = read_lora(open_lora(path), load_skeleton(str(tiny_base)), "x")
    for name, module in lora.modules.items():
        key = "lora_unet_" + name.removeprefix("unet.").replace(".", "_")
        down, up = tensors[f"{key}.lora_down.weight"].double(), tensors[f"{key}.lora_up.weight"].double()
        expected = float(tensors[f"{key}.alpha"]) / down.shape[0] * up @ down
        assert torch.allclose(module.delta(), expected, rtol=1e-6), name
