"""The method registry: a method is one module. A toy method defined here, and nowhere else, is registered, merged
through the Python API, inspected and verified through the CLI, and replayed by `attach` equal to its online rule."""

from __future__ import annotations

import re

import pytest
from conftest import generate, run
from lorasched import LoraschedError, attach
from lorasched.calibration.online import OnlineRule
from lorasched.convert import MergeRequest, merge_loras
from lorasched.merge import rules
from lorasched.merge.checks import LoraSpec
from lorasched.merge.lora import STYLE, SUBJECT
from lorasched.merge.rules.method import Method, Option, RuleOptions, carried
from lorasched.merge.rules.windows import WindowsRule
from lorasched.merge.schedule import REFERENCE_STEPS


class Halves(Method):
    """Subjects on [0, split) of denoising progress, styles on [split, 1)."""

    name = "halves"
    summary = "A toy: subjects first, styles after `split`."
    options = (Option("split", float, "halves: where the styles take over.", default=0.5,
                      problem=lambda split: None if 0 < split < 1 else "must be in (0, 1)"),)
    numbers = ("split",)

    def build(self, loras, options: RuleOptions, device=None, progress=iter, steps: int = REFERENCE_STEPS):
        split = self.settings(options).split
        return WindowsRule.of(loras, split, split), {"split": split}

    def rule_from_file(self, scheduled) -> WindowsRule:
        split = scheduled.params["split"]
        return WindowsRule(split, split, scheduled.roles, carried(scheduled))


@pytest.fixture
def halves():
    method = rules.register(Halves())
    yield method
    rules.unregister(method.name)


@pytest.fixture
def merged(halves, tiny_base, kohya_pair, tmp_path):
    out = tmp_path / "halves.safetensors"
    loras = (LoraSpec(str(kohya_pair[0]), SUBJECT), LoraSpec(str(kohya_pair[1]), STYLE))
    result = merge_loras(MergeRequest(str(tiny_base), loras, str(out), "halves", RuleOptions(split=0.4), steps=10))
    return result, out


def test_a_registered_method_merges_inspects_and_verifies(merged, tiny_base):
    result, out = merged
    assert result.method == "halves" and result.params == {"split": 0.4, "steps": 10}
    assert sum(len(phases) > 1 for phases in result.schedule.layers.values()) > 5
    inspected = run("inspect", out)
    assert inspected.exit_code == 0 and "method      halves  split=0.4" in inspected.output
    verified = run("verify", out, "--base", tiny_base, "--prompts", "a dog", "--seeds", "1", "--steps", "6",
                   "--resolution", "32")
    assert verified.exit_code == 0 and "agreement   100.00%" in verified.output, verified.output


def test_a_registered_method_replays_as_its_online_rule(merged, pipe64, pair):
    _, out = merged
    rule, _ = rules.build("halves", pair, RuleOptions(split=0.4))
    with OnlineRule(pipe64, pair, rule):
        online = generate(pipe64, 9)
    with attach(pipe64, out):
        replayed = generate(pipe64, 9)
    assert (replayed - online).abs().max().item() < 1e-4


def test_a_registered_method_takes_only_its_own_options(halves, tiny_base, kohya_pair, tmp_path):
    loras = (LoraSpec(str(kohya_pair[0]), SUBJECT), LoraSpec(str(kohya_pair[1]), STYLE))
    for options, message in ((RuleOptions(mu=1.0), "--mu: only --method np-lora takes it"),
                             (RuleOptions(split=1.5), "--split 1.5: must be in (0, 1)")):
        with pytest.raises(LoraschedError, match=re.escape(message)):
            merge_loras(MergeRequest(str(tiny_base), loras, str(tmp_path / "x.safetensors"), "halves", options))
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(LoraschedError, match="--split: only --method halves takes it"):
        merge_loras(MergeRequest(str(tiny_base), loras, str(tmp_path / "x.safetensors"), "klora",
                                 RuleOptions(split=0.5)))


def test_a_file_of_an_unregistered_method_is_refused_by_the_converter_in_one_line(merged):
    _, out = merged
    rules.unregister("halves")
    try:
        inspected = run("inspect", out)
    finally:
        rules.register(Halves())
    assert inspected.exit_code == 2 and "lorasched.method is 'halves', not one of klora" in inspected.stderr


def test_names_are_unique():
    with pytest.raises(ValueError, match="taken"):
        rules.register(rules.get("klora"))
