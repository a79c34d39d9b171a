"""SDXL, FLUX.1 and SD3 end to end on tiny pipelines built in code: merge -> replay equals the online K-LoRA rule,
and both export formats load with plain `load_lora_weights` as the same static mix."""

import pytest
import torch
from lora_formats import DEFAULT_TARGETS, flux_kohya_lora, kohya_lora, peft_lora, sgm_kohya_lora
from lorasched.calibration.online import OnlineRule
from lorasched.convert import merge
from lorasched.merge import fileformat, rules
from lorasched.merge.clock import Clock
from lorasched.merge.errors import LoraschedError
from lorasched.merge.lora import STYLE, SUBJECT, denoiser_name
from lorasched.merge.lora_io import read_pair
from lorasched.merge.names import SgmLayout, get_module
from lorasched.merge.quiet import collected_loading_messages
from lorasched.merge.replay import MODES, attach
from lorasched.tiny import ARCHITECTURES, generate
from safetensors import safe_open
from safetensors.torch import save_file

KLORA = rules.RuleOptions(pattern="s*")
STEPS = 7
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


SDXL_CONVS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")


def _sdxl_peft(pipe):
    """The subject adds LoCon convs, the time embedding and both text encoders with per-module ranks; the style
    feed-forwards; both share attention, conv1, proj_out and the upsampler."""
    subject = peft_lora(pipe, "unet", DEFAULT_TARGETS + SDXL_CONVS + ("proj_in", "proj_out", "time_emb_proj"),
                        rank={"to_q": 2, "": 4}, seed=1)
    subject.update(peft_lora(pipe, "text_encoder", TEXT_TARGETS, rank=4, seed=3))
    subject.update(peft_lora(pipe, "text_encoder_2", TEXT_TARGETS, rank=4, seed=4))
    style = peft_lora(pipe, "unet", ("to_q", "to_k", "to_v", "ff.net.2", "conv1", "proj_out", "upsamplers.0.conv"),
                      rank={"": 8}, seed=2)
    return subject, style


def _sdxl_pair(pipe):
    """kohya with alphas, diffusers module names (what diffusers' PEFT→kohya converter writes)."""
    subject, style = _sdxl_peft(pipe)
    return kohya_lora(subject, alpha=2.0), kohya_lora(style, alpha=3.0)


def _sdxl_sgm_pair(pipe):
    """The same LoRAs as kohya sd-scripts writes them for SDXL: SGM block names, `lora_te1_`/`lora_te2_`."""
    subject, style = _sdxl_peft(pipe)
    return sgm_kohya_lora(subject, 2.0, pipe.unet.config), sgm_kohya_lora(style, 3.0, pipe.unet.config)


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


PAIRS = {"sdxl": _sdxl_pair, "sdxl-sgm": _sdxl_sgm_pair, "flux": _flux_pair, "sd3": _sd3_pair}
FORMATS = {"sdxl": ("kohya",), "sdxl-sgm": ("kohya",), "flux": ("diffusers",),
           "sd3": ("diffusers",)}


@pytest.fixture(scope="module", params=list(PAIRS))
def world(request, tmp_path_factory):
    """A saved tiny base, a LoRA pair written in that architecture's trainer formats, and one merge per format.

    `sdxl-sgm` is the `sdxl` pair under kohya sd-scripts' SGM names: everything after reading must be the same."""
    variant = request.param
    architecture = variant.partition("-")[0]
    folder = tmp_path_factory.mktemp(variant)
    pipe = ARCHITECTURES[architecture]()
    pipe.save_pretrained(folder / "base")
    paths = folder / "subject.safetensors", folder / "style.safetensors"
    for path, tensors in zip(paths, PAIRS[variant](pipe)):
        save_file(tensors, path)
    base, subject, style = str(folder / "base"), *map(str, paths)
    files = {}
    for tensor_format in FORMATS[variant]:
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
    switching = [n for n, phases in fileformat.read(path).schedule.layers.items()
                 if len(phases) > 1]
    assert switching, "a schedule without switches would make the equality vacuous"


def test_the_rule_decides_every_module_both_loras_adapt_and_only_those(world):
    """K-LoRA scores (and so switches) exactly the denoiser modules both files adapt, linears and convs alike;
    every other module stays static on the LoRA that adapts it."""
    architecture, pair, files = world
    scheduled = fileformat.read(next(iter(files.values())))
    decided = {name for name, record in scheduled.modules.items() if record.scores is not None}
    both = {name for name in set(pair.subject.modules) & set(pair.style.modules) if pair.is_denoiser(name)}
    assert decided == both and both
    if architecture == "sdxl":
        assert any(name.endswith(("conv1", "conv")) for name in decided), "LoCon convs are decided too"
    for name, phases in scheduled.schedule.layers.items():
        if name not in both:
            assert len(phases) == 1, name
    assert any(len(scheduled.schedule.layers[name]) > 1 for name in both)


@pytest.mark.parametrize("tensor_format", ["kohya", "diffusers"])
def test_plain_load_gives_the_static_mix(world, tensor_format):
    architecture, pair, files = world
    if tensor_format not in files:  # each architecture gets the one naming every loader maps
        folder = next(iter(files.values())).parent
        with pytest.raises(LoraschedError, match=f"--format {tensor_format}: "):
            merge(*map(str, (folder / "base", pair.subject.path, pair.style.path, folder / "other.safetensors")),
                  "klora", KLORA, tensor_format=tensor_format)
        return
    path = files[tensor_format]
    schedule = fileformat.read(path).schedule
    pipe = fresh(architecture)
    with collected_loading_messages() as messages:
        pipe.load_lora_weights(str(path), adapter_name="plain")
    assert [m for m in messages if "key" in m.lower() and "No LoRA keys associated" not in m] == []
    for name in pair.module_names:
        loaded = get_module(pipe, name).get_delta_weight("plain")
        expected = torch.zeros_like(loaded)
        for source, weight in zip((SUBJECT, STYLE), schedule.static_weights(name, 2)):
            if name in pair.source(source).modules:
                expected += weight * pair.source(source).modules[name].delta().reshape(loaded.shape)
        assert torch.allclose(loaded, expected, rtol=1e-3, atol=1e-5), name


def test_compatibility_metadata_names_the_architecture(world):
    architecture, _, files = world
    for path in files.values():
        metadata = fileformat.read(path).metadata
        expected = {"sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd3": "sd3"}[architecture]
        assert metadata["ss_base_model_version"] == expected
        assert metadata["modelspec.merged_from"] == "subject.safetensors, style.safetensors"
        assert "hook" in metadata["modelspec.usage_hint"]


def test_modules_one_lora_adapts_stay_static_at_weight_one(world):
    """Partly overlapping module sets with per-module ranks: a module only one LoRA adapts is that LoRA's alone,
    at weight 1 for every step, and exported at its own rank."""
    _, pair, files = world
    both = set(pair.subject.modules) & set(pair.style.modules)
    alone = {name: source for source in (SUBJECT, STYLE) for name in set(pair.source(source).modules) - both}
    assert any(pair.is_denoiser(name) for name in alone)
    ranks = {module.rank for source in (SUBJECT, STYLE) for module in pair.source(source).modules.values()}
    assert len(ranks) > 1
    for path in files.values():
        scheduled = fileformat.read(path)
        schedule = scheduled.schedule
        for name, source in alone.items():
            assert schedule.layers[name] == ((0.0, pair.selection(source)),), name
            assert schedule.static_weights(name, 2) == ((1.0, 0.0) if source == SUBJECT else (0.0, 1.0)), name
            rank = pair.source(source).modules[name].rank
            assert scheduled.modules[name].ranks == ((rank, 0) if source == SUBJECT else (0, rank)), name


def test_sgm_kohya_names_read_as_their_diffusers_named_twin(tmp_path):
    """kohya sd-scripts' SDXL names (SGM blocks, `lora_te1_text_model_…`) land on the same diffusers modules with
    the same ΔW as the same LoRAs under diffusers names: diffusers' SGM mapping, resnet renames and flattened-CLIP
    prefix handling all hold on this UNet."""
    pipe = ARCHITECTURES["sdxl"]()
    pipe.save_pretrained(tmp_path / "base")
    paths = {}
    for naming, tensors_pair in (("diffusers", _sdxl_pair(pipe)), ("sgm", _sdxl_sgm_pair(pipe))):
        paths[naming] = [tmp_path / f"{naming}-{role}.safetensors" for role in (SUBJECT, STYLE)]
        for path, tensors in zip(paths[naming], tensors_pair):
            save_file(tensors, path)
    with safe_open(str(paths["sgm"][0]), "pt") as handle:
        stems = {key.split(".")[0] for key in handle.keys()}
    for prefix in ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                   "lora_te1_text_model_", "lora_te2_text_model_"):
        assert any(s.startswith(prefix) for s in stems), prefix
    assert not any("down_blocks" in s or "up_blocks" in s or "mid_block_" in s for s in stems)
    twin = read_pair(str(tmp_path / "base"), *map(str, paths["diffusers"]))
    sgm = read_pair(str(tmp_path / "base"), *map(str, paths["sgm"]))
    assert len(sgm.subject.modules) == len(stems)
    for source in (SUBJECT, STYLE):
        expected, read = twin.source(source).modules, sgm.source(source).modules
        assert set(read) == set(expected)
        for name, module in expected.items():
            assert torch.equal(read[name].delta(), module.delta()), name
    assert sgm.decided == twin.decided


@pytest.mark.parametrize("module, sgm", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.1.resnets.0.time_emb_proj", "input_blocks.4.0.emb_layers.1"),
    ("mid_block.attentions.0.transformer_blocks.3.attn2.to_k", "middle_block.1.transformer_blocks.3.attn2.to_k"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2", "output_blocks.2.1.transformer_blocks.9.ff.net.2"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.resnets.0.conv_shortcut", "output_blocks.6.0.skip_connection"),
    ("up_blocks.2.resnets.2.conv1", "output_blocks.8.0.in_layers.2"),
])
def test_sgm_names_match_the_real_sdxl_checkpoint(module, sgm):
    """The SGM names the exporter writes for SDXL base 1.0's UNet (2 layers per block, attention in the two lower
    up levels) are the module names of the real `sd_xl_base_1.0` checkpoint, which kohya sd-scripts LoRAs use."""
    assert SgmLayout(2, (True, True, False)).path(module) == sgm


@pytest.mark.parametrize("architecture", ["sdxl", "flux", "sd3"])
def test_the_replay_clock_reads_each_transformers_timestep(architecture):
    """Replay and the online rule share `Clock`, so replay == online cannot catch a misread timestep: FLUX's
    pipeline hands its transformer timestep / 1000, while SD/SDXL schedulers end on timesteps as small as 1.
    Step n of N must read as progress n / N, and the noise axis must run from pure noise (0) towards clean (1)."""
    pipe = ARCHITECTURES[architecture]()
    pipe.set_progress_bar_config(disable=True)
    clocks = Clock.of(pipe), Clock.of(pipe, axis="noise")
    seen = []

    def record(module, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        seen.append(tuple(clock(timestep) for clock in clocks))

    handle = getattr(pipe, denoiser_name(pipe)).register_forward_pre_hook(record, with_kwargs=True)
    generate(pipe, 5)
    handle.remove()
    progress, noise = zip(*seen)
    assert progress == tuple(n / 5 for n in range(5))
    train_steps = pipe.scheduler.config.num_train_timesteps
    assert noise == pytest.approx([1 - float(t) / train_steps for t in pipe.scheduler.timesteps])
    assert all(a < b for a, b in zip(noise, noise[1:])) and noise[-1] < 1
