"""Calibration: exact recording, the feature-kl rule, aggregation, resume, EST probe β, verify and heatmaps."""

import json
import math

import pytest
import torch
from conftest import run
from lorasched.calibration.aggregate import aggregate, suppress_short_runs
from lorasched.calibration.runner import Log, Settings, calibrate, read_log
from lorasched.evaluation.verify import verify
from lorasched.merge import fileformat, rules
from lorasched.merge.errors import LoraschedError
from lorasched.merge.heatmap import block_of, schedule_cells, split_panels
from lorasched.merge.replay import attach
from lorasched.merge.rules.feature_kl import FeatureKLRule, divergences
from lorasched.merge.schedule import AXIS_NOISE, Schedule, from_rule
from PIL import Image

SIZE = 32
PROMPTS = ("a photo of sks dog", "a red house by the sea", "a bowl of fruit", "a portrait of an old man")


def settings(prompts=PROMPTS[:2], seeds=(0, 1), steps=6, method="feature-kl") -> Settings:
    return Settings(method, tuple(prompts), tuple(seeds), steps, 7.5, SIZE, SIZE, ("subject-sha", "style-sha"))


def test_weight_only_rule_recorded_through_calibration_equals_its_closed_form(pipe, pair, tmp_path):
    rule, _ = rules.build("klora", pair, rules.RuleOptions())
    closed = from_rule(rule, pair)
    log = calibrate(pipe, pair, rule, settings(steps=10, method="klora"), tmp_path / "log.jsonl")
    calls = [call for run in log.runs for call in run["calls"]]
    assert len(log.runs) == 4 and len(calls) == 40
    code = {(0,): "c", (1,): "s", (0, 1): "b"}
    recorded = [(name, call["p"], choice) for call in calls for name, choice in zip(log.layers, call["choices"])]
    assert all(code[closed.active(name, p)] == choice for name, p, choice in recorded)
    assert {choice for _, _, choice in recorded} == {"c", "s"}  # the test pair really switches
    consensus = aggregate(log, pair)
    assert consensus.axis == AXIS_NOISE and all(share == 1.0 for v in consensus.agreement.values() for share in v)
    for call in calls:  # the consensus on the noise axis decides each calibration step as the closed form does
        assert all(consensus.active(n, call["q"]) == closed.active(n, call["p"]) for n in log.layers)


def test_feature_kl_divergences_and_decision_follow_the_documented_rule():
    torch.manual_seed(0)
    h0 = torch.randn(2, 5, 16)
    d_c, d_s = 0.5 * torch.randn(2, 5, 16), 0.05 * torch.randn(2, 5, 16)
    kl_c, kl_s = divergences(h0, d_c, d_s, temperature=2.0)
    scale = 2.0 * h0.pow(2).mean(-1, keepdim=True).sqrt()
    p0, pc = torch.softmax(h0 / scale, -1), torch.softmax((h0 + d_c) / scale, -1)
    expected = (pc * (pc.log() - p0.log())).sum(-1).mean(-1)
    torch.testing.assert_close(kl_c, expected)
    assert (kl_c > kl_s).all()  # the LoRA that moves the features more diverges more
    assert FeatureKLRule(gamma=1.0).subject_mask(kl_c, kl_s).all()
    gamma = float((kl_c / kl_s).max()) * 1.01  # a balance that makes the style's divergence count for more
    assert not FeatureKLRule(gamma=gamma).subject_mask(kl_c, kl_s).any()
    conv = divergences(h0.transpose(1, 2).reshape(2, 16, 5, 1), d_c.transpose(1, 2).reshape(2, 16, 5, 1),
                       d_s.transpose(1, 2).reshape(2, 16, 5, 1), channel_dim=1, temperature=2.0)
    torch.testing.assert_close(conv[0], kl_c)  # conv features: channels at dim 1, same tokens
    assert divergences(h0, torch.zeros_like(h0), d_s)[0].abs().max() < 1e-6  # no change, no divergence


def test_batched_calibration_records_what_single_prompt_runs_record(pipe, pair, tmp_path):
    batched = calibrate(pipe, pair, FeatureKLRule(), settings(), tmp_path / "batched.jsonl", batch_size=2)
    single = calibrate(pipe, pair, FeatureKLRule(), settings(), tmp_path / "single.jsonl", batch_size=1)
    assert batched.gamma == pytest.approx(single.gamma)
    assert [r["calls"][i]["choices"] for r in batched.runs for i in range(6)] == [
        r["calls"][i]["choices"] for r in single.runs for i in range(6)
    ]
    scores = [s for r in batched.runs for call in r["calls"] for pair_ in call["scores"] for s in pair_]
    assert all(s >= 0 and math.isfinite(s) for s in scores)


class Interrupt:
    """A progress bar that stops the run after `limit` steps, like Ctrl-C does."""

    def __init__(self, limit=None):
        self.limit, self.count = limit, 0

    def update(self, n):
        self.count += n
        if self.limit is not None and self.count > self.limit:
            raise KeyboardInterrupt


def test_interrupted_calibration_resumes_without_repeating_runs(pipe, pair, tmp_path):
    path, config = tmp_path / "log.jsonl", settings(prompts=PROMPTS[:3], seeds=(0, 1), steps=4)
    with pytest.raises(KeyboardInterrupt):
        calibrate(pipe, pair, FeatureKLRule(), config, path, batch_size=2, bar=Interrupt(limit=9))
    assert len(read_log(path).runs) == 2  # the first batch of 2 prompts finished and was logged
    counter = Interrupt()
    resumed = calibrate(pipe, pair, FeatureKLRule(), config, path, batch_size=2, bar=counter)
    assert counter.count == 6 * 4  # 2 logged runs counted as done, 4 remaining runs × 4 steps actually run
    fresh = calibrate(pipe, pair, FeatureKLRule(), config, tmp_path / "fresh.jsonl", batch_size=2)
    def choices(log):
        return sorted((r["prompt"], r["seed"], [c["choices"] for c in r["calls"]]) for r in log.runs)

    assert choices(resumed) == choices(fresh) and resumed.gamma == fresh.gamma
    other = settings(prompts=PROMPTS[:3], seeds=(0, 1), steps=5)
    with pytest.raises(LoraschedError, match="other settings"):
        calibrate(pipe, pair, FeatureKLRule(), other, path)


def test_aggregation_takes_the_majority_per_bin_and_suppresses_short_switches(pair):
    layer = pair.decided[0]
    runs = [{"prompt": str(i), "seed": 0, "calls": [{"q": q, "choices": c} for q, c in zip((0.1, 0.5, 0.9), codes)]}
            for i, codes in enumerate(["csc", "css", "ccs"])]
    log = Log(settings=settings(), layers=[layer], gamma=1.0, runs=runs)
    schedule = aggregate(log, pair)
    assert schedule.layers[layer] == ((0.0, (0,)), (0.3, (1,)))
    assert schedule.agreement[layer] == pytest.approx((1.0, 2 / 3, 2 / 3))
    assert schedule.bins == (0.0, 0.3, 0.7)
    assert suppress_short_runs(list("ccsccssss"), 2) == list("cccccssss")
    assert suppress_short_runs(list("scccc"), 2) == list("ccccc")
    smoothed = aggregate(log, pair, min_run=2)  # the one-bin subject run at the start joins the style run
    assert smoothed.layers[layer] == ((0.0, (1,)),)
    assert smoothed.agreement[layer] == pytest.approx((0.0, 2 / 3, 2 / 3))
    restored = Schedule.from_json(schedule.to_json(), 2)  # agreement is stored to 4 decimals
    assert restored.layers == schedule.layers and restored.bins == schedule.bins
    assert restored.agreement[layer] == pytest.approx(schedule.agreement[layer], abs=1e-4)


def test_feature_kl_merge_replays_and_verifies_on_held_out_seeds(tiny_base, kohya_pair, pipe, pair, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "fkl.safetensors"
    merged = run("merge", "--base", tiny_base, "--subject", kohya_pair[0], "--style", kohya_pair[1], "-o", out,
                 "--method", "feature-kl", "--prompts", prompts, "--seeds", "0,1", "--steps", 8,
                 "--resolution", SIZE)
    assert merged.exit_code == 0, merged.output
    log = read_log(tmp_path / "fkl.safetensors.calibration.jsonl")
    assert len(log.runs) == 8 and log.gamma > 0
    scheduled = fileformat.read(out)
    assert scheduled.method == "feature-kl" and scheduled.params["calibration"]["seeds"] == [0, 1]
    schedule = scheduled.schedule
    assert schedule.axis == AXIS_NOISE and set(schedule.agreement) == set(pair.decided)

    handle = attach(pipe, out)  # the calibrated file replays through the same hook
    pipe("a bowl of fruit", num_inference_steps=5, height=SIZE, width=SIZE, output_type="latent")
    handle.detach()

    report_dir = tmp_path / "report"
    checked = run("verify", out, "--base", tiny_base, "--prompts", "a cat on a sofa", "--seeds", "7,8",
                  "--resolution", SIZE, "--subject", kohya_pair[0], "--style", kohya_pair[1], "--report", report_dir)
    assert checked.exit_code == 0, checked.output
    assert "agreement" in checked.stdout and "PSNR" in checked.stdout
    numbers = json.loads((report_dir / "report.json").read_text())
    assert 0.5 < numbers["agreement"] <= 1.0 and numbers["seeds"] == [7, 8] and numbers["steps"] == 8
    assert len(numbers["agreement_per_step"]) == 8 and len(numbers["agreement_per_layer"]) == len(pair.decided)
    grid = Image.open(report_dir / "agreement.png")
    assert grid.size[1] > len(pair.decided) and Image.open(report_dir / "schedule.png").size[1] > 14
    strict = run("verify", out, "--base", tiny_base, "--prompts", "a cat on a sofa", "--seeds", "7,8",
                 "--resolution", SIZE, "--subject", kohya_pair[0], "--style", kohya_pair[1],
                 "--min-agreement", numbers["agreement"] + 1e-6)
    assert strict.exit_code == 1 and "is below --min-agreement" in strict.stderr, strict.output
    dropped = any(0 in record.ranks for name, record in scheduled.modules.items() if name in schedule.agreement)
    assert dropped, "some calibrated layer never uses one LoRA, so the file carries only the other's factors"
    without_sources = run("verify", out, "--base", tiny_base, "--prompts", "x", "--seeds", "7", "--resolution", SIZE)
    assert without_sources.exit_code == 2 and "drops an unused LoRA's factors" in without_sources.stderr


@pytest.mark.parametrize("method", ["klora", "est", "direct"])
def test_verify_reports_full_agreement_and_zero_deviation_for_weight_only_rules(
    tiny_base, kohya_pair, pipe, tmp_path, method
):
    out = tmp_path / f"{method}.safetensors"
    merged = run("merge", "--base", tiny_base, "--subject", kohya_pair[0], "--style", kohya_pair[1], "-o", out,
                 "--method", method, *(("--beta", 0.3) if method == "est" else ()), "--steps", 6)
    assert merged.exit_code == 0, merged.output
    result = verify(pipe, out, ["a cat on a sofa"], [5], 6, 7.5, SIZE)
    assert result.agreement == 1.0
    assert result.latent_max_abs_diff == 0.0 and result.psnr_db_min == math.inf


def test_inspect_draws_the_schedule_heatmap(tiny_base, kohya_pair, pair, tmp_path):
    out, png = tmp_path / "k.safetensors", tmp_path / "k.png"
    assert run("merge", "--base", tiny_base, "--subject", kohya_pair[0], "--style", kohya_pair[1], "-o", out,
               "--steps", 10).exit_code == 0
    shown = run("inspect", out, "--png", png)
    assert shown.exit_code == 0, shown.output
    rule, _ = rules.build("klora", pair, rules.RuleOptions())
    schedule = from_rule(rule, pair)
    layers = sorted(pair.decided)
    expected = [[schedule.active(layer, step / 10) for step in range(10)] for layer in layers]
    assert schedule_cells(fileformat.read(out).schedule, layers, 10) == expected
    colors = {color for _, color in Image.open(png).convert("RGB").getcolors(1 << 20)}
    assert {(230, 140, 40), (60, 110, 200)} <= colors, "subject and style cells are drawn in their legend colours"


def test_pictures_group_layers_by_block_and_split_many_layers_into_panels():
    names = [f"unet.down_blocks.{b}.attentions.0.transformer_blocks.{t}.attn1.to_q"
             for b in range(3) for t in range(300)]
    panels = split_panels(names)
    assert len(panels) == 6 and sum(map(len, panels)) == 900 and max(map(len, panels)) <= 160
    assert [name for panel in panels for name in panel] == names
    assert block_of("unet.mid_block.attentions.0.proj_in") == ("mid_block", "attentions.0.proj_in")
    assert block_of("unet.up_blocks.2.resnets.0.conv1") == ("up_blocks.2", "resnets.0.conv1")
    assert block_of("transformer.single_transformer_blocks.7.proj_mlp") == ("single_transformer_blocks.7", "proj_mlp")


def test_est_without_beta_measures_it_from_probe_images(tiny_base, kohya_pair, tiny_embedders, tmp_path):
    embedder = tiny_embedders[1]
    out = tmp_path / "est.safetensors"
    merged = run("merge", "--base", tiny_base, "--subject", kohya_pair[0], "--style", kohya_pair[1], "-o", out,
                 "--method", "est", "--embedder", embedder, "--prompts", "a photo of sks dog", "--steps", 4,
                 "--resolution", SIZE)
    assert merged.exit_code == 0, merged.output
    params = fileformat.read(out).params
    probe = params["beta_source"]
    assert probe["embedder"] == str(embedder) and probe["prompt"] == "a photo of sks dog" and probe["seed"] == 0
    assert params["beta"] == pytest.approx(1 - probe["similarity"]) and -1 <= probe["similarity"] < 1
    assert "probe β" in run("inspect", out).stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "feature-kl"], "no calibration prompts given"),
        (["--method", "feature-kl", "--prompts", "a dog", "--steps", "0"], "--steps 0"),
        (["--method", "feature-kl", "--prompts", "missing_prompts.txt"], "prompt file does not exist"),
        (["--method", "feature-kl", "--prompts", "a dog", "--seeds", "one,two"], "--seeds"),
        (["--method", "est", "--prompts", "a dog", "--embedder", "./no/such/vit"], "--embedder"),
    ],
)
def test_bad_calibration_input_is_one_line_exit_2(tiny_base, kohya_pair, tmp_path, extra, message):
    out = tmp_path / "out.safetensors"
    result = run("merge", "--base", tiny_base, "--subject", kohya_pair[0], "--style", kohya_pair[1], "-o", out,
                 "--resolution", SIZE, *extra)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()


def test_inspect_png_of_a_plain_lora_is_refused(kohya_pair, tmp_path):
    result = run("inspect", kohya_pair[0], "--png", tmp_path / "x.png")
    assert result.exit_code == 2 and "no schedule for --png" in result.stderr
    assert not (tmp_path / "x.png").exists()
