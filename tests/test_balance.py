"""`--gamma-scale` and `--balance auto`: the γ scale acts where γ is used and is recorded; the search recovers the
setting its reference images were made with, records every candidate in the file, and resumes from its log."""

import json

import pytest
import torch
from conftest import run
from lorasched.evaluation.balance import Candidate, Knob, SearchSettings, grid, search, switch_knob
from lorasched.evaluation.evaluate import render
from lorasched.evaluation.metrics import load_judge
from lorasched.calibration.online import OnlineRule
from lorasched.calibration.runner import read_log
from lorasched.evaluation.verify import verify
from lorasched.merge import fileformat, rules
from lorasched.merge.errors import FormatError
from lorasched.merge.schedule import from_rule
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SIZE, STEPS, PROMPT = 32, 4, "a photo of sks dog"
TARGET = Candidate(beta=0.75, gamma_scale=0.5)  # not the method's own setting (β 0.5, γ × 1)


@pytest.fixture(scope="module")
def klora(pair):
    return rules.build("klora", pair, rules.RuleOptions())


@pytest.fixture(scope="module")
def references(pipe, pair, klora, tmp_path_factory):
    """Subject and style references both made by K-LoRA at TARGET, on the probes' own prompt and seed: the
    candidate that reproduces them scores 1 on both sides, every other one less, so TARGET must win."""
    rule, params = klora
    folder = tmp_path_factory.mktemp("balance-refs")
    with OnlineRule(pipe, pair, rule.balanced(TARGET.beta, TARGET.gamma_scale), samples=1):
        image, _ = render(pipe, PROMPT, 0, STEPS, 7.5, SIZE)
    for side in ("subject", "style"):
        (folder / side).mkdir()
        image.save(folder / side / "made_at_target.png")
    return folder / "subject", folder / "style"


def merge_args(tiny_base, kohya_pair, out, *extra):
    return ["merge", "--base", tiny_base, "--subject", kohya_pair[0], "--style", kohya_pair[1], "-o", out,
            "--steps", STEPS, "--resolution", SIZE, "--prompts", PROMPT, "--seeds", "0", *extra]


def test_gamma_scale_scales_gamma_where_it_is_used_and_is_recorded(tiny_base, kohya_pair, pipe, pair, klora,
                                                                   tmp_path):
    rule, params = klora
    out = tmp_path / "scaled.safetensors"
    merged = run(*merge_args(tiny_base, kohya_pair, out, "--gamma-scale", 2))
    assert merged.exit_code == 0, merged.output
    scheduled = fileformat.read(out)
    assert scheduled.params["gamma_scale"] == 2.0 and scheduled.params["gamma"] == pytest.approx(2 * params["gamma"])
    assert params["gamma_scale"] == 1.0
    expected = from_rule(rule.balanced(rule.ramp.beta, 2.0), pair)
    assert scheduled.schedule.layers == expected.layers
    assert expected.layers != from_rule(rule, pair).layers, "doubling γ moves some switch"
    assert verify(pipe, out, ["a cat"], [3], STEPS, 7.5, SIZE).agreement == 1.0  # the online rule uses the scaled γ
    assert "gamma_scale=2" in run("inspect", out).stdout


def test_balance_auto_recovers_the_known_best_setting_records_the_search_and_resumes(
        tiny_base, kohya_pair, references, tiny_embedders, pair, klora, tmp_path):
    out = tmp_path / "auto.safetensors"
    args = merge_args(tiny_base, kohya_pair, out, "--balance", "auto", "--subject-images", references[0],
                      "--style-images", references[1], "--clip", tiny_embedders[0], "--dino", tiny_embedders[1])
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert "balance auto: β=0.75 γ×0.5 of 9 candidates" in first.stdout
    assert "9 probe images made, 0 read" in first.stdout
    scheduled = fileformat.read(out)
    record = scheduled.params["balance"]
    assert record["chosen"] == {"beta": 0.75, "gamma_scale": 0.5}
    assert [(c["beta"], c["gamma_scale"]) for c in record["candidates"]] == [
        (beta, scale) for beta in (0.25, 0.5, 0.75) for scale in (0.5, 1.0, 2.0)]
    assert record["grid"] == {"beta": [0.25, 0.5, 0.75], "gamma_scale": [0.5, 1.0, 2.0]}
    best = next(c["scores"] for c in record["candidates"] if c["beta"] == 0.75 and c["gamma_scale"] == 0.5)
    assert best["subject_clip"] == pytest.approx(1.0) and best["style_dino"] == pytest.approx(1.0)
    others = [c["scores"]["harmonic_clip"] for c in record["candidates"] if c["scores"] is not best]
    assert max(others) < best["harmonic_clip"]
    assert record["prompts"] == [PROMPT] and record["seeds"] == [0] and record["steps"] == STEPS
    assert record["log"] == "auto.safetensors.balance.jsonl" and record["objective"] == "harmonic_clip"
    rule, params = klora
    assert scheduled.params["beta"] == 0.75 and scheduled.params["gamma_scale"] == 0.5
    assert scheduled.params["gamma"] == pytest.approx(params["gamma"] * 0.5)
    assert scheduled.schedule.layers == from_rule(rule.balanced(0.75, 0.5), pair).layers
    shown = run("inspect", out).stdout
    assert "balance     auto: β=0.75 γ×0.5 of 9 candidates" in shown
    assert sum(line.lstrip().startswith(("β=", "* β=")) for line in shown.splitlines()) == 9
    assert "* β=0.75 γ×0.5" in shown

    log = tmp_path / "auto.safetensors.balance.jsonl"
    written = log.read_text()
    assert len(written.splitlines()) == 1 + 9  # header + one line per probe image
    first_bytes = out.read_bytes()
    out.unlink()
    again = run(*args)
    assert again.exit_code == 0, again.output
    assert "0 probe images made, 9 read" in again.stdout  # nothing generated again
    assert log.read_text() == written and out.read_bytes() == first_bytes

    other = run(*merge_args(tiny_base, kohya_pair, out, "--balance", "auto", "--subject-images", references[0],
                            "--style-images", references[1], "--clip", tiny_embedders[0], "--dino",
                            tiny_embedders[1], "--balance-gamma-scales", "1,3"))
    assert other.exit_code == 2 and "balance log was made with other settings" in other.stderr


class Interrupt:
    """A progress bar that stops the search after `limit` images, like Ctrl-C does; counts what it sees."""

    def __init__(self, limit=None):
        self.limit, self.count = limit, 0

    def update(self, n):
        self.count += n
        if self.limit is not None and self.count > self.limit:
            raise KeyboardInterrupt


def test_interrupted_search_resumes_without_repeating_images(pipe, pair, klora, references, tiny_embedders,
                                                             tmp_path):
    rule, params = klora
    judge = load_judge(str(tiny_embedders[0]), str(tiny_embedders[1]), str(references[0]), str(references[1]), "cpu")
    settings = SearchSettings(
        method="klora", candidates=grid(rule.ramp.beta, gamma_scales=(0.5, 2.0)), prompts=(PROMPT, "a red house"),
        seeds=(0,), steps=2, guidance=7.5, size=SIZE, pair=("s", "t"), references=("a", "b"), clip="c", dino="d")
    made, knob = [], switch_knob(rule, params)

    def make_rule(candidate, gamma):
        made.append(candidate)
        return knob.rule(candidate, gamma)

    def search_with(bar, path):
        return search(pipe, pair, settings, judge, path, Knob(knob.beta, knob.fixed, knob.pair_gamma, make_rule), bar)

    with pytest.raises(KeyboardInterrupt):  # stopped after the 5th image: candidate 2 has one of its two
        search_with(Interrupt(limit=4), tmp_path / "log.jsonl")
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1 + 5
    counter = Interrupt()
    resumed = search_with(counter, tmp_path / "log.jsonl")
    assert (resumed.generated, resumed.resumed, counter.count) == (7, 5, 12)
    candidates = list(settings.candidates)
    assert made == candidates[:3] + candidates[2:]  # the resumed search went on from candidate 2's missing image
    fresh = search_with(None, tmp_path / "fresh.jsonl")
    assert resumed.scores == fresh.scores and resumed.chosen == fresh.chosen


def test_feature_kl_balance_searches_the_gamma_scale_and_calibrates_with_it(tiny_base, kohya_pair, references,
                                                                             tiny_embedders, tmp_path):
    out = tmp_path / "fkl.safetensors"
    merged = run(*merge_args(tiny_base, kohya_pair, out, "--method", "feature-kl", "--balance", "auto",
                             "--subject-images", references[0], "--style-images", references[1],
                             "--balance-gamma-scales", "0.5,2", "--clip", tiny_embedders[0], "--dino",
                             tiny_embedders[1]))
    assert merged.exit_code == 0, merged.output
    params = fileformat.read(out).params
    record, scale = params["balance"], params["gamma_scale"]
    assert [c["beta"] for c in record["candidates"]] == [None, None] and record["grid"]["beta"] == []
    assert record["chosen"]["gamma_scale"] == scale and scale in (0.5, 2.0)
    calibration = read_log(tmp_path / "fkl.safetensors.calibration.jsonl")
    assert calibration.settings.gamma_scale == scale
    assert params["gamma"] == pytest.approx(calibration.gamma * scale)
    header = json.loads((tmp_path / "fkl.safetensors.balance.jsonl").read_text().splitlines()[0])
    assert header["gamma"] == pytest.approx(calibration.gamma)  # the search's γ is the calibration's own
    assert "balance     auto: γ×" in run("inspect", out).stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--balance", "auto"], "give --subject-images and --style-images"),
        (["--balance", "auto", "--method", "direct", "--subject-images", "R", "--style-images", "R"],
         "direct has no balance knob"),
        (["--balance", "auto", "--method", "feature-kl", "--subject-images", "R", "--style-images", "R",
          "--balance-betas", "0.1,0.2"], "no ramp offset β"),
        (["--balance", "auto", "--subject-images", "R", "--style-images", "R", "--gamma-scale", "2"],
         "--balance-gamma-scales"),
        (["--balance", "auto", "--subject-images", "R", "--style-images", "R", "--balance-gamma-scales", "1,-1"],
         "positive finite"),
        (["--balance", "auto", "--subject-images", "R", "--style-images", "R", "--balance-betas", "a,b"],
         "--balance-betas"),
        (["--balance", "auto", "--subject-images", "no/such/dir", "--style-images", "R"], "no such folder"),
        (["--subject-images", "R"], "need --balance auto"),
        (["--gamma-scale", "0"], "--gamma-scale 0.0: must be a positive"),
        (["--method", "direct", "--gamma-scale", "2"], "--gamma-scale: only --method klora or est or feature-kl takes it"),
    ],
)
def test_bad_balance_input_is_one_line_exit_2(tiny_base, kohya_pair, references, tiny_embedders, tmp_path, extra,
                                              message):
    out = tmp_path / "out.safetensors"
    extra = [str(references[0]) if item == "R" else item for item in extra]
    result = run(*merge_args(tiny_base, kohya_pair, out, "--clip", tiny_embedders[0], "--dino", tiny_embedders[1],
                             *extra))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists()


def test_a_malformed_search_record_is_refused_by_the_reader(tiny_base, kohya_pair, references, tiny_embedders,
                                                            tmp_path):
    out = tmp_path / "auto.safetensors"
    merged = run(*merge_args(tiny_base, kohya_pair, out, "--balance", "auto", "--subject-images", references[0],
                             "--style-images", references[1], "--balance-betas", "0.5", "--balance-gamma-scales",
                             "1", "--clip", tiny_embedders[0], "--dino", tiny_embedders[1]))
    assert merged.exit_code == 0, merged.output
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(out)
    params = json.loads(metadata["lorasched.params"])
    for problem, balance in (("none of its candidates", {**params["balance"], "chosen": {"beta": 9.0,
                                                                                         "gamma_scale": 1.0}}),
                             ("without finite knobs and scores",
                              {**params["balance"], "candidates": [{"beta": 0.5, "gamma_scale": 1.0, "scores": {}}]}),
                             ("without its fields", {"candidates": []})):
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, bad, {**metadata, "lorasched.params": json.dumps({**params, "balance": balance})})
        with pytest.raises(FormatError, match=problem):
            fileformat.read(bad)
    assert torch.isfinite(torch.tensor(params["balance"]["candidates"][0]["scores"]["harmonic_clip"]))
