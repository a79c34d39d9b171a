"""Every real LoRA file in shared/fixtures/loras: inspected, and merged with another of its base (a random-weight
SD1.5 or SD2.1 skeleton of real size, configs built in code), or refused with one clear line."""

import pytest
import torch
from conftest import FIXTURES, needs_shared
from lora_formats import peft_lora
from lorasched.convert import merge
from lorasched.merge import fileformat, rules
from lorasched.merge.anatomy import describe, inspect_lora
from lorasched.merge.base import load_skeleton
from lorasched.merge.errors import LoraschedError
from lorasched.merge.lora_io import open_lora, read_lora
from lorasched.tiny import save_sd_configs
from safetensors.torch import save_file

pytestmark = needs_shared

# file -> (format inspect reports, architecture, what merging does: None = reads, else the refusal it names)
EXPECTED = {
    "FaithSang+anime-lora-gnerator+adapter_model.safetensors": ("raw PEFT adapter", "SD1.x", None),
    "FaithSang+anime-lora-gnerator+pytorch_lora_weights.safetensors": ("denoiser-relative", "SD1.x", None),
    "Haseebae+Synthetic_dataset_generator_with_stable_diffusion+pytorch_lora_weights.safetensors":
        ("attention processors", "SD1.x", None),
    "KohakuBlueleaf+LyCORIS+smart_falcon_4_lokr.safetensors": ("LyCORIS LoKr", "SD1.x", None),
    "Riniii09+IAssignment2+pytorch_lora_weights.safetensors": ("non-PEFT", "SD1.x", None),
    "catundchat+stable-diffusion-v1.5-lora+pytorch_lora_weights.bin": ("attention processors", "SD1.x", "pickle"),
    "catundchat+stable-diffusion-v1.5-lora+pytorch_lora_weights.safetensors": ("attention processors", "SD1.x", None),
    "cloneofsimo+lora+analog_svd_rank4.safetensors": ("cloneofsimo", "unknown", "cloneofsimo lora_diffusion"),
    "cloneofsimo+lora+lora_kiriko.pt": (None, None, "pickle"),
    "filip131311+prject-dyfuzja-ml+pytorch_lora_weights.safetensors": ("non-PEFT", "SD1.x", None),
    "reddinft+sandmantales-hackathon+pytorch_lora_weights.safetensors": ("non-PEFT", "SD1.x", None),
    "timohavdk+sd-lora+new.safetensors": ("malformed kohya", "SD1.x", "malformed kohya-like keys"),
    "vfph55+my_lora+pytorch_lora_weights.safetensors": ("non-PEFT", "SD2.x", None),
}
PAIRS = [  # (base, subject, style): every readable SD1.5 file once, the pickle through --allow-pickle
    ("sd15", "Riniii09+IAssignment2+pytorch_lora_weights.safetensors",
     "FaithSang+anime-lora-gnerator+pytorch_lora_weights.safetensors"),
    ("sd15", "filip131311+prject-dyfuzja-ml+pytorch_lora_weights.safetensors",
     "catundchat+stable-diffusion-v1.5-lora+pytorch_lora_weights.safetensors"),
    ("sd15", "Haseebae+Synthetic_dataset_generator_with_stable_diffusion+pytorch_lora_weights.safetensors",
     "reddinft+sandmantales-hackathon+pytorch_lora_weights.safetensors"),
    ("sd15", "FaithSang+anime-lora-gnerator+adapter_model.safetensors",
     "catundchat+stable-diffusion-v1.5-lora+pytorch_lora_weights.bin"),
    ("sd21", "vfph55+my_lora+pytorch_lora_weights.safetensors", "partner"),
]


def test_the_fixture_table_is_complete():
    assert sorted(p.name for p in FIXTURES.iterdir() if p.name != "README.md") == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_inspect_reports_format_architecture_and_refusal(name):
    layout, architecture, refusal = EXPECTED[name]
    path = FIXTURES / name
    if layout is None:  # a bare pickled list: even with --allow-pickle there is nothing to describe
        with pytest.raises(LoraschedError, match="bare pickled list of 256 tensors without key names"):
            inspect_lora(path, allow_pickle=True)
        return
    anatomy = inspect_lora(path, allow_pickle=path.suffix == ".bin")
    assert layout in anatomy.layout
    assert anatomy.architecture.startswith(architecture)
    lines = describe(anatomy)
    assert len(lines) == 10 and all("\n" not in line for line in lines)
    if "LyCORIS LoKr" in layout:  # rank 4 · 4 once converted; its text-encoder parts are LoKr too
        assert anatomy.refusal is None and anatomy.ranks == {16: 350} == {16: anatomy.modules}
    elif refusal in (None, "pickle"):
        assert anatomy.refusal is None and anatomy.ranks == {4: anatomy.modules} and not anatomy.text_encoder_parts
    else:
        assert refusal in anatomy.refusal


@pytest.mark.parametrize("name", [n for n, (_, _, refusal) in EXPECTED.items() if refusal])
def test_unsupported_files_are_refused_in_one_line(name):
    refusal = EXPECTED[name][2]
    with pytest.raises(LoraschedError) as caught:
        open_lora(FIXTURES / name)
    message = str(caught.value)
    assert message.startswith(str(FIXTURES / name) + ": ") and "\n" not in message
    assert refusal in message


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real-size")
    return {version: str(save_sd_configs(folder / version, version)) for version in ("sd15", "sd21")}


@pytest.mark.parametrize("base_version, subject, style", PAIRS, ids=[p[1].split("+")[0] for p in PAIRS])
def test_real_pairs_merge_and_load_back_as_the_static_mix(bases, tmp_path, base_version, subject, style):
    base = bases[base_version]
    subject_path = FIXTURES / subject
    if style == "partner":  # the only SD2.x fixture: pair it with a random diffusers-format LoRA of that base
        style_path = tmp_path / "partner.safetensors"
        save_file(peft_lora(load_skeleton(base), "unet", ("to_q", "to_v", "ff.net.2"), rank=8, seed=3), style_path)
    else:
        style_path = FIXTURES / style
    out = tmp_path / "merged.safetensors"
    result = merge(base, str(subject_path), str(style_path), str(out), "klora", rules.RuleOptions(), steps=20,
                   allow_pickle=True)
    assert result.decided > 0
    schedule = fileformat.read(out).schedule
    skeleton = load_skeleton(base)
    sources = {
        "subject": read_lora(open_lora(subject_path, allow_pickle=True), skeleton, "subject"),
        "style": read_lora(open_lora(style_path, allow_pickle=True), skeleton, "style"),
    }
    merged = read_lora(open_lora(out), skeleton, "merged")
    assert set(merged.modules) == set(sources["subject"].modules) | set(sources["style"].modules)
    for name in sorted(merged.modules)[::7]:
        expected = sum(
            weight * sources[role].modules[name].delta()
            for role, weight in zip(("subject", "style"), schedule.static_weights(name, 2))
            if name in sources[role].modules
        )
        assert torch.allclose(merged.modules[name].delta(), expected, rtol=2e-2, atol=1e-6), name


def test_a_pivotal_tuning_file_is_told_by_its_lora_keys_and_its_embeddings_named(tmp_path):
    """cloneofsimo's pivotal-tuning script saves textual-inversion embeddings (`<s1>`, `<s2>`) beside the
    `text_encoder:0:down`-style LoRA keys: still its layout (not "unknown", not "no LoRA factors"), extras named."""
    from safetensors.torch import load_file

    tensors = load_file(str(FIXTURES / "cloneofsimo+lora+analog_svd_rank4.safetensors"))
    tensors |= {"<s1>": torch.randn(768), "<s2>": torch.randn(768)}
    path = tmp_path / "pivotal.safetensors"
    save_file(tensors, path)
    anatomy = inspect_lora(path)
    assert anatomy.layout.startswith("cloneofsimo lora_diffusion")
    assert "2 textual-inversion embedding tensors: <s1>, <s2>" in anatomy.layout
    assert anatomy.refusal.startswith("cloneofsimo lora_diffusion format") and "<s1>, <s2>" in anatomy.refusal
    with pytest.raises(LoraschedError, match=r"cloneofsimo lora_diffusion format.*besides 2 textual-inversion"):
        open_lora(path)

