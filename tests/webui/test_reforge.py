"""The reForge side of sd-webui-lorasched inside the vendored reForge (reforge_world.py): `<lora:NAME:S>` of a
lorasched file replayed per layer and per step equals the hand-set per-step reference, a prompt without one is
untouched, bad files are reported in one line and left out, and nothing is left in the weights.

Run with the ComfyUI venv: `.venv-comfy/bin/python -m pytest tests/webui/test_reforge.py -q -p no:cacheprovider`.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reforge_world as world  # noqa: E402
from broken_files import broken  # noqa: E402

TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def reforge(tmp_path_factory) -> SimpleNamespace:
    """The host, the files in its Lora folder (good, plain and bad), and one model kept across tests as the WebUI
    keeps its checkpoint loaded."""
    folder = tmp_path_factory.mktemp("reforge")
    loras = folder / "Lora"
    loras.mkdir()
    host = world.install_host(loras)
    made = world.make_files(folder)
    for path in [*made.files.values(), made.plain]:
        shutil.copy(path, loras / path.name)
    bad = broken(made.files["klora"], loras)
    host.networks.list_available_networks()  # the Lora page's refresh
    return SimpleNamespace(host=host, pipe=made.pipe, files=made.files, plain=made.plain, bad=bad,
                           model=world.sd_model(world.reforge_unet(made.pipe.unet)))


def _fresh(reforge) -> SimpleNamespace:
    return world.sd_model(world.reforge_unet(reforge.pipe.unet))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("steps", [6, 11])
@pytest.mark.parametrize("sampler", ["Euler", "Heun"])
@pytest.mark.parametrize("name", ["klora", "nway", "feature-kl"])
def test_replay_equals_the_hand_set_reference(reforge, name, sampler, steps, strength):
    """Every evaluation carries exactly its step's active sources (one, several or none) times S, for a first-
    and a second-order sampler (noise axis: those of its own noise level); the file as a plain LoRA (its static
    mix) is far from that."""
    path = reforge.files[name]
    prompt = f"a photo <lora:{path.stem}:{strength}>"
    out = world.generate(reforge.model, prompt, steps, sampler)
    expected = world.reference(reforge.pipe, path, strength, steps, sampler)
    static = world.generate(reforge.model, prompt, steps, sampler, replay=False)
    print(f"{name} {sampler} {steps} steps S={strength}: |replay - reference| = {_max_diff(out, expected):.1e}, "
          f"|static mix - reference| = {_max_diff(static, expected):.1e}")
    assert _max_diff(out, expected) <= TOLERANCE
    assert _max_diff(static, expected) > 100 * TOLERANCE


def test_only_the_weights_whose_sources_change_are_rewritten(reforge, caplog):
    """Per switch, the clock rewrites exactly the layers whose active sources differ between the two steps (read
    off lorasched's own schedule), nothing in between; a second run first restores its first step's sources."""
    from lorasched.merge import fileformat

    path, steps = reforge.files["klora"], 20
    schedule = fileformat.read(path).schedule
    times = [n / steps for n in range(steps)]

    def switched(before: float, after: float) -> int:
        return sum(schedule.active(name, before) != schedule.active(name, after) for name in schedule.layers)

    caplog.set_level(logging.DEBUG)
    world.generate(reforge.model, f"a photo <lora:{path.stem}:1>", steps)
    caplog.clear()
    world.generate(reforge.model, f"a photo <lora:{path.stem}:1>", steps)
    writes = [tuple(int(word) for word in record.getMessage().split(",")[1:3] for word in word.split() if
                    word.isdigit()) for record in caplog.records if record.getMessage().startswith("lorasched: time")]
    expected = [switched(times[-1], times[0])] + [switched(a, b) for a, b in zip(times, times[1:])]
    expected = [(count, count) for count in expected if count]
    print(f"{len(writes)} switches, {sum(count for count, _ in writes)} weights rewritten in a {steps}-step run")
    assert writes == expected and 1 < len(writes) < steps


@pytest.mark.parametrize("sampler", ["Euler", "Heun"])
def test_hires_pass_continues_the_schedule_where_its_sigmas_are(reforge, sampler):
    """The hires pass is a sampling run of its own (process_before_every_sampling again, the Lora extension's
    objects copied again) over the last steps of a longer schedule: its p is that of those steps, as the ComfyUI
    node places a run of denoise < 1."""
    path = reforge.files["nway"]
    out = world.generate(reforge.model, f"a photo <lora:{path.stem}:0.8>", 6, sampler, hires_steps=4)
    expected = world.reference(reforge.pipe, path, 0.8, 6, sampler, hires_steps=4)
    assert out.shape[-1] == 16 and _max_diff(out, expected) <= TOLERANCE


@pytest.mark.parametrize("prompt", ["a photo", "a photo <lora:style:0.8>"])
def test_a_prompt_without_a_lorasched_file_is_untouched(reforge, prompt):
    """Bitwise the same generation with and without the extension (no LoRA, a plain LoRA), before and after a
    replayed generation, and the denoiser object itself is the Lora extension's."""
    before = world.generate(reforge.model, prompt, 6, replay=False)
    world.generate(reforge.model, f"a photo <lora:{reforge.files['klora'].stem}:1>", 6, "Heun")
    after = world.generate(reforge.model, prompt, 6)
    assert torch.equal(before, after)
    assert reforge.model.forge_objects.unet is reforge.model.forge_objects_after_applying_lora.unet


def test_unet_strength_zero_leaves_the_denoiser_alone(reforge, capfd):
    """`<lora:NAME:1:0>` (text encoder 1, unet 0): the Lora extension loads nothing into the denoiser, so there
    is nothing to replay and nothing to report."""
    capfd.readouterr()
    out = world.generate(reforge.model, f"a photo <lora:{reforge.files['klora'].stem}:1:0>", 6)
    assert "[lorasched]" not in "".join(capfd.readouterr())
    assert torch.equal(out, world.generate(reforge.model, "a photo", 6))


def test_no_changed_weights_are_left_behind(reforge):
    """After replayed generations (which end in other sources than they start), a clean generation and the
    model's weights are bitwise those of a fresh model."""
    for name in ("klora", "nway"):
        world.generate(reforge.model, f"a photo <lora:{reforge.files[name].stem}:0.6>", 11, "Heun", hires_steps=3)
    fresh = _fresh(reforge)
    assert torch.equal(world.generate(reforge.model, "a photo", 6), world.generate(fresh, "a photo", 6))
    weights, clean = reforge.model.forge_objects.unet.model.state_dict(), fresh.forge_objects.unet.model.state_dict()
    assert all(torch.equal(weights[key], clean[key]) for key in clean)


@pytest.mark.parametrize("kind", ["tampered", "other size", "other architecture", "format 3"])
def test_a_bad_file_is_reported_in_one_line_and_left_out(reforge, capfd, kind):
    """One console line naming the file and the problem (not repeated by the hires pass), no traceback, and the
    generation is bitwise the one without the file; so is the next one."""
    path, problem = reforge.bad[kind]
    capfd.readouterr()
    out = world.generate(reforge.model, f"a photo <lora:{path.stem}:1>", 6, hires_steps=3)
    captured = capfd.readouterr()
    console = captured.out + captured.err
    lines = [line for line in console.splitlines() if "[lorasched]" in line]
    print(lines)
    assert len(lines) == 1 and path.name in lines[0] and problem in lines[0]
    assert "Traceback" not in console
    clean = world.generate(_fresh(reforge), "a photo", 6, hires_steps=3)
    assert torch.equal(out, clean)
    assert torch.equal(world.generate(reforge.model, "a photo", 6, hires_steps=3), clean)


def test_measure_times_replay_against_the_plain_lora(reforge):
    """The benchmark entry point runs and reports both step times (the ratio itself is for the benchmark)."""
    result = world.measure(steps=4, repeats=1)
    print(result)
    assert result["replayed_s"] > 0 and result["plain_s"] > 0 and result["ratio"] > 0
