"""The node inside ComfyUI: what it writes and when, low-VRAM partial loading, half precision, clones, the text
encoder, LoraLoader's static mix of the same file, bad files, and the pack's registry and workflow files."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil

import comfy.lora
import comfy.utils
import execution
import folder_paths
import nodes
import pytest
import torch
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io
from conftest import NODE_PACK
from lorasched.merge import fileformat
from lorasched.merge.replay import source_factors
from reference import reference_sample, sample, step_times
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from worlds import sd_conditioning

STEPS = 8


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _replay(model):
    """The node's clock on a patched model (its wrappers are bound methods of one Replay)."""
    return model.wrappers[WrappersMP.PREDICT_NOISE]["lorasched"][0].__self__


def _weight_keys(model, path) -> dict[str, str]:
    """Module name -> the model weight it patches, by ComfyUI's key map."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    scheduled = fileformat.read(path)
    targets = {name: key_map[record.key] for name, record in scheduled.modules.items() if name.startswith("unet.")}
    return {name: target if isinstance(target, str) else target[0] for name, target in targets.items()}


@pytest.mark.parametrize("name", ["klora-s", "klora-s*"])
def test_weights_change_only_at_switch_steps(sd, sd_model, apply, name):
    """Per model evaluation, which weights differ from the evaluation before: exactly those whose source the
    schedule changes at that step; none in between. A second run first restores the first step's sources."""
    path, steps = sd.files[name], 20
    (model, _) = apply(sd_model(), path)
    changed: list[set[str]] = []
    previous: dict[str, torch.Tensor] = {}

    def record(executor, x, timestep, model_options, seed):
        weights = {key: value.detach().clone() for key, value in model.model.diffusion_model.state_dict().items()}
        changed.append({f"diffusion_model.{key}" for key, value in weights.items()
                        if key in previous and not torch.equal(value, previous[key])})
        previous.update(weights)
        return executor(x, timestep, model_options, seed)

    model.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, "test", record)  # runs inside the node's wrapper
    conds = sd_conditioning(0)
    sample(model, _noise(), conds, steps, "euler", cfg=5.0)
    sample(model, _noise(), conds, steps, "euler", cfg=5.0)

    schedule, keys = fileformat.read(path).schedule, _weight_keys(model, path)
    times = step_times(model, "progress", steps)

    def switched(before: float, after: float) -> set[str]:
        return {keys[name] for name in keys if schedule.active(name, before) != schedule.active(name, after)}

    expected = [set()] + [switched(a, b) for a, b in zip(times, times[1:])]
    assert changed[1:steps] == expected[1:]
    assert changed[steps] == switched(times[-1], times[0]) and changed[steps + 1:] == expected[1:]
    print(f"{name}, {steps} steps: {sum(map(len, changed))} weight writes over two runs, at "
          f"{sum(map(bool, changed))} of {len(changed)} evaluations ({len(keys)} scheduled layers)")
    assert 0 < sum(map(bool, expected)) < steps - 1


@pytest.mark.parametrize("unloaded", ["some", "all"])
def test_a_partially_loaded_model_follows_the_schedule(sd, sd_model, apply, unloaded):
    """ComfyUI's low-VRAM state, as `free_memory` leaves it: some layers unloaded to weight functions that patch
    per call (LowVramPatch), the rest patched in place; or every layer cast at run time, the path a cast-time
    patcher (newer ComfyUI's dynamic VRAM) takes for all of them. The output still equals the hand-set reference."""
    path = sd.files["klora-s*"]
    (model, _) = apply(sd_model(), path)
    switching = {patch.key for patch in _replay(model).patches}
    split = {}

    def unload_some(executor, patcher, noise_shape, conds, model_options=None):
        out = executor(patcher, noise_shape, conds, model_options=model_options)
        # ComfyUI unloads the smallest layers first: free all layers smaller than the widest switching ones
        sizes = {f"{name}.weight": size for size, name, _, _ in patcher._load_list()}
        widest = max(sizes[key] for key in switching) if unloaded == "some" else float("inf")
        patcher.partially_unload(patcher.offload_device, sum(size for size in sizes.values() if size < widest))
        split["per call"] = {key for key in switching if key not in patcher.backup}
        split["in place"] = switching - split["per call"]
        assert patcher.model.model_lowvram and patcher.lowvram_patch_counter() > 0
        return out

    model.add_wrapper_with_key(WrappersMP.PREPARE_SAMPLING, "test", unload_some)
    noise, conds = _noise(4), sd_conditioning(4)
    out = sample(model, noise, conds, STEPS, "euler", cfg=5.0)
    reference = reference_sample(sd_model(), path, noise, conds, STEPS, "euler", cfg=5.0)
    print(f"partial load: {len(split['per call'])} switching weights patched per call, {len(split['in place'])} "
          f"in place; max |node - reference| = {(out - reference).abs().max().item():.1e}")
    assert split["per call"] and (bool(split["in place"]) == (unloaded == "some"))
    assert (out - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_switched_half_precision_weights_are_a_fresh_load(sd, sd_model, apply, dtype):
    """Back-and-forth switches leave every weight bitwise what ComfyUI's own load of those sources gives: each
    switch recomputes from the original, so nothing drifts in fp16/bf16."""
    (model, _) = apply(sd_model(dtype), sd.files["klora-s*"])
    replay = _replay(model)
    model.patch_model()
    points = [0.0] + replay.change_points
    for time in points * 3 + points[::-1] * 3:
        replay.switch(model, time)
    switched = {key: value.clone() for key, value in model.model.state_dict().items()}
    model.unpatch_model()
    model.patch_model()  # ComfyUI recomputes every patched weight from its backup, with the sources now active
    assert all(torch.equal(switched[key], value) for key, value in model.model.state_dict().items())
    model.unpatch_model()


def test_a_clone_without_the_node_is_unchanged(sd, sd_model, apply):
    """A second branch of the workflow on the same loaded model, without the node, samples as the bare model:
    before and after the node's branch has run (and switched weights)."""
    base = sd_model()
    other_branch = base.clone()
    (noded, _) = apply(base, sd.files["klora-s*"])
    noise, conds = _noise(5), sd_conditioning(5)
    before = sample(other_branch, noise, conds, STEPS, "euler", cfg=5.0)
    sample(noded, noise, conds, STEPS, "euler", cfg=5.0)
    after = sample(other_branch, noise, conds, STEPS, "euler", cfg=5.0)
    assert torch.equal(before, after) and torch.equal(before, sample(sd_model(), noise, conds, STEPS, "euler", cfg=5.0))
    assert not base.patches and "lorasched" not in base.wrappers.get(WrappersMP.PREDICT_NOISE, {})


@pytest.mark.parametrize("world, file", [("sd", "klora-s*"), ("sd_sets", "nway")])
def test_text_encoders_get_the_first_phase_through_comfyui_lora_path(request, sd_model, sd_clip, apply, world, file):
    """The CLIP part: every text-encoder layer gets original + its sources (every LoRA with a text-encoder part:
    both of the pair, three of the N-way set), the input CLIP is untouched, and strength_model 0 leaves the model
    as it came in."""
    path = request.getfixturevalue(world).files[file]
    clip, model = sd_clip(), sd_model()
    originals = {key: value.clone() for key, value in clip.cond_stage_model.state_dict().items()}
    (same_model, patched) = apply(model, path, clip, strength_model=0.0, strength_clip=1.0)
    assert same_model is model
    scheduled = fileformat.read(path, with_tensors=True)
    factors = source_factors(scheduled)
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    patched.load_model()  # as CLIPTextEncode does: ComfyUI swaps the input CLIP's weights for the patched ones
    text_layers = [name for name in scheduled.modules if name.startswith("text_encoder.")]
    assert text_layers
    for name in text_layers:
        key = key_map[scheduled.modules[name].key]
        expected = originals[key].float()
        for source in scheduled.schedule.layers[name][0][1]:
            down, up = factors[name][source]
            expected += up @ down
        weight = comfy.utils.get_attr(clip.cond_stage_model, key)  # in the text encoder's dtype (fp16 on CPU)
        torch.testing.assert_close(weight, expected.to(weight.dtype), rtol=0, atol=torch.finfo(weight.dtype).eps)
    patched.patcher.unpatch_model()
    assert all(torch.equal(value, originals[key]) for key, value in clip.cond_stage_model.state_dict().items())


@pytest.mark.parametrize("world, name", [("sd", "klora-s"), ("sd", "klora-s*"), ("sd", "feature-kl"),
                                         ("sdxl", "klora-s*"), ("flux", "klora-s*")])
def test_lora_loader_reads_every_key_as_the_static_mix(request, loras_folder, caplog, world, name):
    """LoraLoader on the same file: every key loads (no "lora key not loaded"), and each weight gets the file's
    own factors, c_c·ΔW_c + c_s·ΔW_s: the static mix, not the schedule."""
    path = getattr(request.getfixturevalue(world), "files")[name]
    (loras_folder / path.name).write_bytes(path.read_bytes())
    model = request.getfixturevalue(f"{world}_model")()
    clip = request.getfixturevalue("sd_clip")() if world == "sd" else None
    with caplog.at_level(logging.WARNING):
        static, _ = nodes.LoraLoader().load_lora(model, clip, path.name, 1.0, 1.0)
    assert not [r.message for r in caplog.records if "lora key not loaded" in r.message or "NOT LOADED" in r.message]
    scheduled = fileformat.read(path, with_tensors=True)  # factors under `<key>.lora_down/up.weight`, any format
    key_map = comfy.lora.model_lora_keys_unet(static.model, {})
    static.patch_model()
    expected = {}
    for module, record in scheduled.modules.items():
        if module.startswith(("unet.", "transformer.")):
            target = key_map[record.key]
            key, offset = (target, None) if isinstance(target, str) else target[:2]
            weight = expected.setdefault(key, static.backup[key].weight.clone())
            view = weight if offset is None else weight.narrow(*offset)
            down, up = (scheduled.tensors[f"{record.key}.lora_{part}.weight"] for part in ("down", "up"))
            view += (up.flatten(1) @ down.flatten(1)).reshape(view.shape)
    assert all(torch.equal(comfy.utils.get_attr(static.model, key), weight) for key, weight in expected.items())
    static.unpatch_model()


@pytest.mark.parametrize("damage", ["plain LoRA", "tampered", "not a LoRA", "newer format", "unknown source",
                                    "other architecture"])
def test_bad_files_raise_a_clear_error(sd, flux, sd_model, apply, tmp_path, damage):
    source = sd.files["klora-s"]
    with safe_open(source, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(source)
    target = tmp_path / f"{damage.replace(' ', '_')}.safetensors"
    expected = {
        "plain LoRA": "a plain LoRA, not a lorasched file",
        "tampered": "tensor hash does not match",
        "not a LoRA": ": not a lorasched file",
        "newer format": "format 3 is not supported .this reader reads 1, 2.; update lorasched",
        "unknown source": "lorasched.schedule has phases .* for unet.*, not .*source index < 2",
        "other architecture": "have no weight in this model .SD15.* flux1",
    }[damage]
    if damage == "plain LoRA":
        target.write_bytes(sd.pair[0].read_bytes())
    elif damage == "tampered":
        key = next(iter(tensors))
        tensors[key] = tensors[key] * 1.001  # re-quantised, say: same names and shapes, other bytes
        save_file(tensors, target, metadata=metadata)
    elif damage == "not a LoRA":
        save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4)}, target)
    elif damage == "newer format":
        save_file(tensors, target, metadata={**metadata, "lorasched.format_version": "3"})
    elif damage == "unknown source":
        schedule = json.loads(metadata["lorasched.schedule"])
        layer = next(name for name in schedule["layers"] if name.startswith("unet."))
        schedule["layers"][layer] = [[0.0, [0]], [0.5, [0, 2]]]
        save_file(tensors, target, metadata={**metadata, "lorasched.schedule": json.dumps(schedule)})
    else:
        target.write_bytes(flux.files["klora-s*"].read_bytes())
    with pytest.raises(ValueError, match=expected) as raised:
        apply(sd_model(), target)
    assert str(raised.value).startswith(str(target) + ":") and "\n" not in str(raised.value)
    print(f"{damage}: {raised.value}")


def test_an_sd_file_on_flux_is_refused(sd, flux_model, apply):
    with pytest.raises(ValueError, match="klora_s.safetensors: .* have no weight in this model .Flux.* sd_v1"):
        apply(flux_model(), sd.files["klora-s"])


def test_a_noise_axis_file_is_refused_on_a_sampling_without_training_steps(sd, sd_model, apply):
    """feature-kl reads q = 1 - t / T_train; ComfyUI's EDM sampling (t = log(sigma) / 4) has no such t."""
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    (edm,) = ModelSamplingContinuousEDM().patch(sd_model(), "eps", 120.0, 0.002)
    with pytest.raises(ValueError, match="feature_kl.safetensors: a calibrated .noise-axis. schedule cannot be read"):
        apply(edm, sd.files["feature-kl"])


def test_the_pack_is_a_registry_node(node):
    """ComfyUI's own parser reads the `[tool.comfy]` table, and the node is registered under its display name."""
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(NODE_PACK))
    assert config.project.name == "comfyui-lorasched" and config.tool_comfy.display_name == "lorasched"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["LoraschedLoadScheduledLora"] == "Load Scheduled LoRA (lorasched)"
    assert list(node.INPUT_TYPES()["required"]) == ["model", "clip", "lora_name", "strength_model", "strength_clip"]
    assert list(node.RETURN_TYPES) == ["MODEL", "CLIP"]
    assert issubclass(node, io.ComfyNode) and node.GET_SCHEMA().node_id == "LoraschedLoadScheduledLora"


def test_a_file_rewritten_under_its_name_runs_the_node_again(node, sd, loras_folder):
    """ComfyUI caches a node's output by its inputs and `fingerprint_inputs`: the file's version is part of it."""
    path = loras_folder / "rewritten.safetensors"
    shutil.copy(sd.files["klora-s"], path)
    before = node.fingerprint_inputs(lora_name=path.name)
    os.utime(path, (before + 10, before + 10))
    assert node.fingerprint_inputs(lora_name=path.name) == before + 10


def test_example_workflows_validate_in_comfyui(node, tmp_path, loras_folder):
    """The API workflow passes ComfyUI's own prompt validation (with its model files present by name), and the UI
    workflow is the same graph: same nodes, widget values and links."""
    api = json.loads((NODE_PACK / "example_workflow_api.json").read_text())
    ui = json.loads((NODE_PACK / "example_workflow.json").read_text())
    (tmp_path / "checkpoints").mkdir()
    folder_paths.add_model_folder_path("checkpoints", str(tmp_path / "checkpoints"))
    try:
        (tmp_path / "checkpoints" / api["1"]["inputs"]["ckpt_name"]).touch()
        (loras_folder / api["2"]["inputs"]["lora_name"]).touch()
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("example", api, None))
    finally:
        folder_paths.folder_names_and_paths["checkpoints"][0].remove(str(tmp_path / "checkpoints"))
    assert valid, (error, node_errors)
    assert {str(node["id"]): node["type"] for node in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    for node in ui["nodes"]:
        inputs = api[str(node["id"])]["inputs"]
        assert all(value in inputs.values() or value == "fixed" for value in node["widgets_values"])
        for slot in node["inputs"]:
            link = next(link for link in ui["links"] if link[0] == slot["link"])
            assert inputs[slot["name"]] == [str(link[1]), link[2]]


def test_a_patch_rebuilt_as_dynamic_vram_rebuilds_it_follows_the_clock(sd, sd_model, apply):
    """Newer ComfyUI's cast-time patcher rebuilds every patch as `type(p)(p.loaded_keys, <weights moved>)` (its
    LoRAAdapters likewise) and patches with the copy: the copy adds the sources the clock set on the original."""
    (model, _) = apply(sd_model(), sd.files["klora-s*"])
    patch = next(patch for patch in _replay(model).patches if len(patch.module.factors) == 2)

    def rebuilt(adapter):
        weights = tuple(w.clone() if isinstance(w, torch.Tensor) else w for w in adapter.weights)
        return type(adapter)(adapter.loaded_keys, weights)

    copy = type(patch)(patch.loaded_keys, (patch.weights[0], *(rebuilt(a) for a in patch.weights[1:])))
    weight = comfy.utils.get_attr(model.model, patch.key).detach().float()
    for selection in ((0,), (1,), (0, 1), ()):
        patch.active = selection
        ours, theirs = (comfy.lora.calculate_weight([(1.0, p, 1.0, None, None)], weight.clone(), patch.key)
                        for p in (patch, copy))
        assert torch.equal(ours, theirs)
        assert torch.equal(theirs, weight) == (selection == ())
