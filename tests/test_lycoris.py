"""LyCORIS inputs: the real LoKr fixture merges with a real SD1.5 LoRA under every weight-only method, its modules
carried exactly; LoKr and LoHa files made by LyCORIS' own code (Tucker convs included) merge and replay equal to
the online rule. (Their conversion against ComfyUI's own weight adapters: tests/comfyui/test_lycoris.py.)"""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES, generate, needs_shared, run
from lorasched.calibration.online import OnlineRule
from lorasched.merge import rules, schema
from lorasched.merge.lora_io import read_pair
from lorasched.merge.replay import attach
from lycoris_files import save_lycoris
from safetensors import safe_open

LOKR = FIXTURES / "KohakuBlueleaf+LyCORIS+smart_falcon_4_lokr.safetensors"
STYLE = FIXTURES / "reddinft+sandmantales-hackathon+pytorch_lora_weights.safetensors"
SD15 = FIXTURES.parents[1] / "fixtures" / "bases" / "sd15"
METHOD_ARGS = {
    "klora": (), "est": ("--beta", 0.3), "direct": (), "np-lora": (), "switch": (), "windows": (),
    "blocks": ("--blocks", "subject=unet.down_blocks.*,style=unet.up_blocks.*"),
}


@needs_shared
@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_the_lokr_fixture_merges_with_a_real_lora_under_every_weight_only_method(method, tmp_path):
    out = tmp_path / f"{method}.safetensors"
    result = run("merge", "--base", SD15, "--subject", LOKR, "--style", STYLE, "--method", method,
                 *METHOD_ARGS[method], "-o", out)
    assert result.exit_code == 0, result.output
    scheduled = schema.read(out, with_tensors=True)
    carried = [record.ranks[0] for record in scheduled.modules.values() if record.ranks[0]]
    assert 200 < len(carried) <= 350 and set(carried) == {16}  # rank 4 · 4; a rule may leave it out of a layer


@needs_shared
def test_each_lokr_module_of_a_direct_file_is_the_kronecker_delta(tmp_path):
    """ΔW = kron(w1_a·w1_b, w2_a·w2_b) · alpha / rank(w2_b), as ComfyUI applies the file, for all 350 modules."""
    out = tmp_path / "direct.safetensors"
    assert run("merge", "--base", SD15, "--subject", LOKR, "--style", STYLE, "--method", "direct",
               "-o", out).exit_code == 0
    scheduled = schema.read(out, with_tensors=True)
    by_key = {record.key: name for name, record in scheduled.modules.items()}
    checked = 0
    with safe_open(LOKR, "pt") as lokr:
        prefixes = sorted({key.rsplit(".", 1)[0] for key in lokr.keys()})
        for prefix in prefixes:
            part = {name: lokr.get_tensor(f"{prefix}.{name}").double()
                    for name in ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha")}
            expected = torch.kron(part["lokr_w1_a"] @ part["lokr_w1_b"], part["lokr_w2_a"] @ part["lokr_w2_b"])
            expected *= float(part["alpha"]) / part["lokr_w2_b"].shape[0]
            down, up = scheduled.factors(by_key[prefix])[0]
            delta = up.double().flatten(1) @ down.double().flatten(1)
            assert delta.shape == expected.shape
            assert (delta - expected).norm() <= 1e-5 * expected.norm(), prefix  # some modules are all zero
            checked += 1
    assert checked == 350


@pytest.fixture(scope="module")
def lycoris_inputs(tiny_base, kohya_pair, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    folder = tmp_path_factory.mktemp("lycoris")
    files = {}
    for variant in ("lokr-tucker", "loha-tucker", "lokr-both"):
        files[variant] = folder / f"{variant}.safetensors"
        save_lycoris(pipe, variant, files[variant], seed=5)
    return files


@pytest.mark.parametrize("variant", ["lokr-tucker", "loha-tucker", "lokr-both"])
@pytest.mark.parametrize("method", ["klora", "feature-kl"])
def test_a_lycoris_subject_replays_equal_to_its_online_rule(variant, method, lycoris_inputs, tiny_base, kohya_pair,
                                                           pipe64, tmp_path):
    subject, style = lycoris_inputs[variant], kohya_pair[1]
    out = tmp_path / "merged.safetensors"
    extra = ("--prompts", "a photo of sks dog", "--seeds", "0", "--resolution", 32) if method == "feature-kl" else ()
    merged = run("merge", "--base", tiny_base, "--subject", subject, "--style", style, "--method", method,
                 "--steps", 8, *extra, "-o", out)
    assert merged.exit_code == 0, merged.output
    scheduled = schema.read(out)
    assert any(record.ranks[0] for record in scheduled.modules.values())
    if method == "klora":
        pair = read_pair(str(tiny_base), str(subject), str(style))
        with OnlineRule(pipe64, pair, rules.from_file(scheduled)):
            online = generate(pipe64, 8)
        with attach(pipe64, out):
            replayed = generate(pipe64, 8)
        assert (replayed - online).abs().max().item() < 1e-4
    else:  # calibrated on one prompt and seed: on those the replay takes every decision the online rule takes
        verified = run("verify", out, "--base", tiny_base, "--prompts", "a photo of sks dog", "--seeds", 0,
                       "--steps", 8, "--resolution", 32, "--subject", subject, "--style", style)
        assert verified.exit_code == 0 and "agreement   100.00%" in verified.output, verified.output


def test_a_converted_rank_beyond_what_is_worth_storing_is_truncated_and_reported(tiny_base, kohya_pair, tmp_path):
    """LoHa of factor rank 8 is a rank-64 LoRA, above half of the tiny layers' 32 or 64 columns: each such layer
    keeps the best rank-16 or -32 factors, and the file records the error its discarded singular values make."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    subject = tmp_path / "loha8.safetensors"
    save_lycoris(pipe, "loha", subject, seed=7, rank=8, text_encoder=False)
    out = tmp_path / "direct.safetensors"
    merged = run("merge", "--base", tiny_base, "--subject", subject, "--style", kohya_pair[1], "--method", "direct",
                 "-o", out)
    assert merged.exit_code == 0, merged.output
    scheduled = schema.read(out, with_tensors=True)
    record = scheduled.params["rank"]
    assert record["request"] is None and 0 < record["max_error"] < 1 and record["errors"]
    with safe_open(subject, "pt") as loha:
        by_key = {r.key: name for name, r in scheduled.modules.items()}
        for prefix in sorted({key.rsplit(".", 1)[0] for key in loha.keys()}):
            name = by_key[prefix]
            part = {n: loha.get_tensor(f"{prefix}.{n}").double() for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a",
                                                                          "hada_w2_b", "alpha")}
            exact = (part["hada_w1_a"] @ part["hada_w1_b"]) * (part["hada_w2_a"] @ part["hada_w2_b"])
            exact *= float(part["alpha"]) / part["hada_w1_b"].shape[0]
            down, up = scheduled.factors(name)[0]
            kept = up.double().flatten(1) @ down.double().flatten(1)
            values = torch.linalg.svdvals(exact.flatten(1))
            cap = min(exact.flatten(1).shape) // 2
            assert scheduled.modules[name].ranks[0] == min(64, cap)
            predicted = float((values[cap:] ** 2).sum().sqrt() / values.norm())
            assert float((exact.flatten(1) - kept).norm() / exact.norm()) == pytest.approx(predicted, abs=1e-5)
            assert record["errors"].get(name, [0.0])[0] == pytest.approx(predicted, abs=1e-5)
    inspected = run("inspect", out)
    assert "LyCORIS layers capped at half min(out, in)" in inspected.output
