"""The Forge host replays a lorasched file exactly through Forge's own `<lora:NAME:S>` path: every sampled latent
equals the same Forge model with each step's weights set by hand from the file (lorasched's own reader), for a
K-LoRA pair and a three-source LoRA Switch file with LoRA-free phases, at S = 1 and 0.6, two step counts, Euler and
Heun, under another plain LoRA, and in Forge's online mode; it writes only the weights that change at a switch; a
prompt without the file is untouched; a sampler without sigmas gets the plain LoRA; and a file that cannot be
replayed is reported in one console line and left out, with nothing left behind.

Run alone (Forge's `modules`/`backend` packages are process-wide): `.venv-comfy/bin/python -m pytest
tests/webui/test_forge.py -q -p no:cacheprovider`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from broken_files import rewritten
from forge_world import LATENT, generate, make_files, make_world, measure, reference
from lorasched.merge import fileformat
from safetensors.torch import save_file

TOLERANCE = 1e-4  # float32 latents
PROMPT = "a photo"
# Forge's prompt_parser has a docstring with "\(", compiled here because the vendor folder gets no bytecode
pytestmark = pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("forge"))


@pytest.fixture(scope="module")
def world(files):
    return make_world(files.klora.parent)


@pytest.fixture(scope="module")
def bare(files):
    """Clean generations of PROMPT on a world no LoRA has touched."""
    clean = make_world(files.klora.parent)
    return {steps: generate(clean, PROMPT, steps, script=False) for steps in (5, 6)}


def _schedule(path: Path):
    return fileformat.read(path).schedule


def _states(path: Path, steps: int) -> list[tuple]:
    """Every scheduled layer's sources at each step's p = n / N (lorasched's own schedule)."""
    schedule = _schedule(path)
    return [tuple(schedule.active(name, n / steps) for name in schedule.layers) for n in range(steps)]


@pytest.mark.parametrize("sampler, steps", [("Euler", 8), ("Euler", 5), ("Heun", 5)])
@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("name", ["klora", "switch3"])
def test_replays_the_schedule_exactly(files, world, name, strength, sampler, steps):
    path = getattr(files, name)
    states = _states(path, steps)
    assert sum(a != b for a, b in zip(states, states[1:])) > 0  # layers switch during this run
    prompt = f"{PROMPT} <lora:{path.stem}:{strength}>"
    out = generate(world, prompt, steps, sampler)
    expected = reference(path, PROMPT, strength, steps, sampler)
    plain = generate(world, prompt, steps, sampler, script=False)
    gap = (out - expected).abs().max().item()
    print(f"{name} S={strength} {sampler} {steps}: max |replay - reference| = {gap:.1e}, "
          f"|replay - plain LoRA| up to {(out - plain).abs().max().item():.1f}")
    assert gap <= TOLERANCE
    assert (out - plain).abs().max().item() > 100 * TOLERANCE  # the schedule is not the static mix


@pytest.mark.parametrize("sampler", ["Euler", "Heun"])
def test_the_hires_pass_continues_the_schedule_where_its_steps_are(files, world, sampler):
    """The hires pass (a new sampler, the Script's hook again, `sample_img2img` of the last 4 steps of a schedule
    of 4 / 0.5 = 8) replays at the p of those steps, as in reForge, A1111 and the ComfyUI node."""
    prompt = f"{PROMPT} <lora:{files.switch3.stem}:0.8>"
    out = generate(world, prompt, 6, sampler, hires_steps=4)
    expected = reference(files.switch3, PROMPT, 0.8, 6, sampler, hires_steps=4)
    assert out.shape[-1] == 2 * LATENT[-1] and (out - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("sampler, steps", [("Euler", 8), ("Heun", 5)])
def test_replays_under_another_lora_on_the_same_layers(files, world, sampler, steps):
    """A plain LoRA loaded with the file stays in every rewritten weight (Forge's whole patch list per key)."""
    plain = files.klora.parent / "plain_subject.safetensors"
    shutil.copy(files.inputs["subject"], plain)
    out = generate(world, f"{PROMPT} <lora:{plain.stem}:0.5> <lora:{files.klora.stem}:0.6>", steps, sampler)
    expected = reference(files.klora, PROMPT, 0.6, steps, sampler, plain=(plain, 0.5))
    assert (out - expected).abs().max().item() <= TOLERANCE


def test_replays_in_forge_online_mode(files, monkeypatch):
    """Forge's online LoRA mode (its choice for quantized UNets, with `online_lora` set): the scheduled patches are
    merged at every forward by `operations.get_weight_and_bias`, so the schedule plays with no weight written.
    The tiny UNet's storage is labelled fp8 (its weights stay float32) to make Forge choose it."""
    from backend.args import dynamic_args

    monkeypatch.setitem(dynamic_args, "online_lora", True)
    world = make_world(files.klora.parent)
    unet = world.sd_model.forge_objects.unet
    monkeypatch.setattr(unet.model, "storage_dtype", torch.float8_e4m3fn)
    out = generate(world, f"{PROMPT} <lora:{files.klora.stem}:1>", 5, "Heun")
    assert not unet.lora_loader.backup and unet.lora_loader.online_backup  # nothing merged into the weights
    assert (out - reference(files.klora, PROMPT, 1.0, 5, "Heun")).abs().max().item() <= TOLERANCE


def test_the_n_way_file_has_lora_free_phases(files):
    scheduled = fileformat.read(files.switch3)
    assert len(scheduled.sources) == 3
    assert any(selection == () for phases in scheduled.schedule.layers.values() for _, selection in phases)


def test_denoiser_is_scheduled_and_text_encoders_stay_static(files, world):
    """The UNet carries the scheduled patch set in the place of the file's static one; the text encoders keep
    Forge's own static patches of the file."""
    strength = 0.6
    generate(world, f"{PROMPT} <lora:{files.klora.stem}:{strength}>", 5)
    objects = world.sd_model.forge_objects
    unet = {identifier[0]: identifier for identifier in objects.unet.lora_patches}
    clip = {identifier[0]: identifier for identifier in objects.clip.patcher.lora_patches}
    [scheduled] = unet
    assert scheduled.startswith(f"{files.klora}#lorasched") and unet[scheduled][1] == strength
    patches = next(iter(objects.unet.lora_patches.values()))
    assert all(patch[1][0] == "lorasched" for key_patches in patches.values() for patch in key_patches)
    assert list(clip) == [str(files.klora)] and clip[str(files.klora)][1] == strength
    clip_patches = objects.clip.patcher.lora_patches[clip[str(files.klora)]]
    assert clip_patches and all(patch[1][0] == "lora" for key_patches in clip_patches.values()
                                for patch in key_patches)
    kept = world.sd_model.forge_objects_after_applying_lora.unet.lora_patches
    assert [identifier[0] for identifier in kept] == [str(files.klora)]  # Forge's own objects keep the plain load


def test_writes_only_the_weights_that_switch(files, world, monkeypatch):
    """A second run of the same file: Forge merges nothing (its loaded LoRA set is unchanged); the extension
    rewrites, at the run's start and at each switch point, exactly the weights whose sources change, one merge
    each, and never forces a full refresh."""
    import backend.patcher.lora as forge_lora

    steps, prompt = 8, f"{PROMPT} <lora:{files.klora.stem}:1>"
    generate(world, prompt, steps)
    merged, refreshes = [], []
    merge = forge_lora.merge_lora_to_weight
    refresh = forge_lora.LoraLoader.refresh

    def counting_merge(patches, weight, key="online_lora", computation_dtype=torch.float32):
        merged.append(key)
        return merge(patches, weight, key, computation_dtype)

    def counting_refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        refreshes.append(force_refresh)
        return refresh(self, lora_patches, offload_device, force_refresh)

    monkeypatch.setattr(forge_lora, "merge_lora_to_weight", counting_merge)
    monkeypatch.setattr(forge_lora.LoraLoader, "refresh", counting_refresh)
    generate(world, prompt, steps)
    schedule = _schedule(files.klora)
    names = [name for name in schedule.layers if name.startswith("unet.")]
    times = [(steps - 1) / steps] + [n / steps for n in range(steps)]  # the previous run ended at its last step
    expected = sum(schedule.active(name, a) != schedule.active(name, b)
                   for a, b in zip(times, times[1:]) for name in names)
    assert not any(refreshes)
    assert 0 < len(merged) == expected < len(names) * steps
    assert len(set(merged)) < len(names)  # layers that never switch are never written


def test_a_prompt_without_the_file_is_bitwise_unchanged(files, world, bare):
    assert torch.equal(generate(world, PROMPT, 5), bare[5])
    generate(world, f"{PROMPT} <lora:{files.klora.stem}:1>", 6)
    assert torch.equal(generate(world, PROMPT, 5), bare[5])  # nothing of the replay is left in the weights
    assert torch.equal(generate(world, PROMPT, 6, script=False), bare[6])


def test_a_sampler_without_sigmas_plays_the_static_mix(files, world, capsys):
    """DDIM steps on timesteps, not sigmas: the file plays as Forge's plain LoRA, and the console says so."""
    prompt = f"{PROMPT} <lora:{files.klora.stem}:1>"
    capsys.readouterr()
    out = generate(world, prompt, 5, "DDIM")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[lorasched]")]
    assert len(lines) == 1 and files.klora.name in lines[0] and "static mix" in lines[0]
    assert torch.equal(out, generate(world, prompt, 5, "DDIM", script=False))


def _other_size(folder: Path, target: Path) -> None:
    """A K-LoRA file merged by lorasched on a tiny SD1 pipeline whose UNet is wider (same layer names)."""
    from diffusers import UNet2DConditionModel
    from lorasched.convert import MergeRequest, merge_loras
    from lorasched.merge import rules
    from lorasched.merge.checks import LoraSpec
    from lorasched.merge.lora import STYLE, SUBJECT
    from lorasched.tiny import random_kohya_lora, tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    config = {**pipe.unet.config, "block_out_channels": (32, 48)}
    pipe.unet = UNet2DConditionModel.from_config(config)
    pipe.save_pretrained(folder / "wide")
    pair = []
    for role, seed in ((SUBJECT, 1), (STYLE, 2)):
        path = folder / f"wide_{role}.safetensors"
        save_file(random_kohya_lora(pipe, 4, 4.0, seed=seed), path)
        pair.append(LoraSpec(str(path), role))
    merge_loras(MergeRequest(str(folder / "wide"), tuple(pair), str(target), "klora",
                             rules.RuleOptions(pattern="s*"), steps=8, device="cpu"))


BAD = {"tampered": ("tensor hash does not match", lambda files, target: rewritten(files.klora, target, tamper=True)),
       "newer_format": ("format 3", lambda files, target: rewritten(files.klora, target, version="3")),
       "other_size": ("of another size", lambda files, target: _other_size(files.folder, target))}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_file_that_cannot_replay_is_reported_and_left_out(files, world, bare, capsys, kind):
    problem, make = BAD[kind]
    target = files.klora.parent / f"bad_{kind}.safetensors"
    make(files, target)
    capsys.readouterr()
    out = generate(world, f"{PROMPT} <lora:{target.stem}:1>", 5)
    console = capsys.readouterr()
    lines = [line for line in (console.out + console.err).splitlines() if line.startswith("[lorasched]")]
    print("\n".join(lines))
    assert len(lines) == 1 and target.name in lines[0] and problem in lines[0]
    assert "Traceback" not in console.out + console.err
    assert torch.equal(out, bare[5])  # generated without the file
    objects = world.sd_model.forge_objects
    assert not any(str(target) in identifier[0] for patcher in (objects.unet, objects.clip.patcher)
                   for identifier in patcher.lora_patches)
    assert torch.equal(generate(world, PROMPT, 5), bare[5])


def test_measure_reports_the_step_time_ratio():
    result = measure(steps=4, repeats=1)
    print(json.dumps(result))
    assert set(result["seconds_per_step"]) == {"replay", "plain_lora", "bare"}
    assert result["replay_over_plain_lora"] > 0
