"""The A1111 side of sd-webui-lorasched inside the vendored A1111 1.10 (a1111_world.py): `<lora:NAME:S>` of a
lorasched file replayed per layer and per step equals the hand-set per-step reference, a prompt without one is
untouched, bad files are reported in one line and left out, and nothing is left in the weights.

Run with the ComfyUI venv (k-diffusion installed per requirements-a1111.txt):
`.venv-comfy/bin/python -m pytest -c tests/webui/pytest.ini tests/webui/test_a1111.py`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import a1111_world as world  # noqa: E402
from broken_files import broken  # noqa: E402

TOLERANCE = 1e-4
ROUNDING = 1e-5  # relative: float32 sums in another order, through a tiny random model that amplifies them
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def a1111(tmp_path_factory) -> SimpleNamespace:
    """The host with the files in its Lora folder (good, plain and bad), its model (kept across tests as the WebUI
    keeps its checkpoint loaded), an un-named copy for the references, and the clean image of PROMPT."""
    folder = tmp_path_factory.mktemp("a1111")
    loras = folder / "Lora"
    loras.mkdir()
    made = world.make_files(folder)
    for path in [*made.files.values(), made.plain]:
        shutil.copy(path, loras / path.name)
    bad = broken(made.files["klora"], loras)
    host = world.Host(loras).open()
    try:
        model = world.host_model(host, made.pipe)
        reference_model = world.TinyModel(made.pipe)
        originals = {key: value.clone() for key, value in model.state_dict().items()}
        yield SimpleNamespace(host=host, files=made.files, bad=bad, model=model, reference_model=reference_model,
                              originals=originals, clean=world.generate(host, reference_model, PROMPT, 6))
    finally:
        host.close()


def _weights_clean(a1111) -> bool:
    return all(torch.equal(value, a1111.originals[key]) for key, value in a1111.model.state_dict().items())


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("steps", [6, 11])
@pytest.mark.parametrize("sampler", ["Euler", "Heun"])
@pytest.mark.parametrize("name", ["klora", "switch3", "windows3"])
def test_replay_equals_hand_set_reference(a1111, name, sampler, steps, strength):
    """K-LoRA (layers switching between a subject and a style) and N-way files with LoRA-free phases (LoRA Switch
    turns, a windows gap) through `<lora:NAME:S>`, against weights set by hand per step; consecutive tests reuse
    the host's loaded network across strengths, samplers and step counts."""
    host = a1111.host
    out = world.generate(host, a1111.model, f"{PROMPT} <lora:{name}:{strength}>", steps, sampler)
    expected = world.reference(host, a1111.reference_model, a1111.files[name], strength, PROMPT, steps, sampler)
    assert (out - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("sampler", ["Euler", "Heun"])
def test_hires_pass_continues_the_schedule_where_its_steps_are(a1111, sampler):
    """The hires pass (a new sampler, process_before_every_sampling again, `sample_img2img` of the last 4 steps of a
    schedule of 4 / 0.5 = 8) replays at the p of those steps, as in reForge, Forge and the ComfyUI node."""
    host = a1111.host
    out = world.generate(host, a1111.model, f"{PROMPT} <lora:switch3:0.8>", 6, sampler, hires_steps=4)
    expected = world.reference(host, a1111.reference_model, a1111.files["switch3"], 0.8, PROMPT, 6, sampler,
                               hires_steps=4)
    assert out.shape[-1] == 2 * world.LATENT[-1] and (out - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("steps", [6, 8])  # not 11: its middle step's noise level falls on a calibration bin edge
@pytest.mark.parametrize("sampler", ["Euler", "Heun"])
def test_noise_axis_replay_equals_reference(a1111, sampler, steps):
    """A calibrated (feature-kl) file switches on each evaluation's noise level q = 1 - t / T, Heun's second
    evaluation at its own."""
    host = a1111.host
    out = world.generate(host, a1111.model, f"{PROMPT} <lora:feature-kl:0.6>", steps, sampler)
    expected = world.reference(host, a1111.reference_model, a1111.files["feature-kl"], 0.6, PROMPT, steps, sampler)
    assert (out - expected).abs().max().item() <= TOLERANCE


def test_accordion_off_is_the_plain_lora(a1111):
    """The same tensors as a plain LoRA (no lorasched metadata) go to A1111's own LoRA module type and give the
    static mix, which the replay differs from; with the Script's accordion off the lorasched file gives that
    static mix (as a sum per source, so up to rounding), on again it replays (the infotext names it), off again
    it is the static mix again."""
    host = a1111.host
    plain = world.generate(host, a1111.model, f"{PROMPT} <lora:plain:0.6>", 6, "Heun")
    modules = next(iter(host.networks.loaded_networks)).modules.values()
    assert all(isinstance(module, host.network_lora.NetworkModuleLora) for module in modules)
    off = world.generate(host, a1111.model, f"{PROMPT} <lora:klora:0.6>", 6, "Heun", enabled=False)
    assert "lorasched" not in host.last_processing.extra_generation_params
    modules = next(iter(host.networks.loaded_networks)).modules.values()
    assert all(isinstance(module, host.a1111.ScheduledModule) for module in modules)
    assert (off - plain).abs().max().item() <= ROUNDING * plain.abs().max().item()
    replay = world.generate(host, a1111.model, f"{PROMPT} <lora:klora:0.6>", 6, "Heun")
    assert host.last_processing.extra_generation_params["lorasched"].startswith("klora (klora,")
    expected = world.reference(host, a1111.reference_model, a1111.files["klora"], 0.6, PROMPT, 6, "Heun")
    assert (replay - expected).abs().max().item() <= TOLERANCE
    assert (plain - replay).abs().max().item() > 100 * ROUNDING * plain.abs().max().item()
    off_again = world.generate(host, a1111.model, f"{PROMPT} <lora:klora:0.6>", 6, "Heun", enabled=False)
    assert torch.equal(off_again, off)


def test_functional_mode_equals_reference(a1111):
    """With the `lora_functional` option A1111 adds each network's output at every call; the active sources are
    read there, so the replay needs no re-merge."""
    host = a1111.host
    host.shared.opts.lora_functional = True
    try:
        out = world.generate(host, a1111.model, f"{PROMPT} <lora:windows3:0.6>", 6, "Heun")
    finally:
        host.shared.opts.lora_functional = False
    expected = world.reference(host, a1111.reference_model, a1111.files["windows3"], 0.6, PROMPT, 6, "Heun")
    assert (out - expected).abs().max().item() <= TOLERANCE


def test_prompt_without_file_is_unchanged(a1111):
    """Without the file the image is bitwise the clean one: with the extension installed, after a replayed run
    (A1111 restores the switched layers from its backup), and with the extension uninstalled."""
    host = a1111.host
    assert torch.equal(world.generate(host, a1111.model, PROMPT, 6), a1111.clean)
    world.generate(host, a1111.model, f"{PROMPT} <lora:switch3:1>", 6, "Heun")
    assert torch.equal(world.generate(host, a1111.model, PROMPT, 6), a1111.clean)
    assert _weights_clean(a1111)
    host.a1111.unload()
    try:
        assert torch.equal(world.generate(host, a1111.model, PROMPT, 6), a1111.clean)
    finally:
        host.a1111.setup()


@pytest.mark.parametrize("case", ["tampered", "other size", "other architecture", "format 3"])
def test_bad_file_is_reported_and_left_out(a1111, case, capfd):
    """One console line naming the file and the problem, no traceback, the image as without the file, and the
    weights clean after the next generation."""
    host = a1111.host
    path, problem = a1111.bad[case]
    capfd.readouterr()
    out = world.generate(host, a1111.model, f"{PROMPT} <lora:{path.stem}:1>", 6)
    printed = capfd.readouterr()
    lines = [line for line in (printed.out + printed.err).splitlines() if path.name in line]
    assert len(lines) == 1 and problem in lines[0], printed
    assert "Traceback" not in printed.out + printed.err
    assert torch.equal(out, a1111.clean)
    assert torch.equal(world.generate(host, a1111.model, PROMPT, 6), a1111.clean)
    assert _weights_clean(a1111)


def test_measure_runs(a1111):
    """The benchmark entry point, on the open host (it opens its own when called alone)."""
    result = world.measure(steps=4, repeats=1, host=a1111.host)
    assert result["ratio"] > 0 and result["replay_step_s"] > 0
