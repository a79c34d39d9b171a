"""Selection rules against hand-computed cases (shared/reference/methods.md)."""

import pytest
import torch
from lorasched.merge.lora import LoraFile, LoraModule, LoraSet
from lorasched.merge.rules import est, klora
from lorasched.merge.rules.ramp import Ramp
from lorasched.merge.rules.switch import SwitchRule, trimmed_mean_gamma


def lora(down, up, scale=1.0) -> LoraModule:
    return LoraModule(torch.tensor(down, dtype=torch.float32), torch.tensor(up, dtype=torch.float32), scale)


SUBJECT, STYLE = (0,), (1,)  # a pair's selections: source 0 is the subject, 1 the style


def pair_of(subject: dict, style: dict) -> LoraSet:
    files = [LoraFile(path=n, sha256="", dtype=torch.float32, modules=m) for n, m in (("c", subject), ("s", style))]
    return LoraSet.pair(files[0], files[1], denoiser="unet")


def test_trimmed_mean_drops_ratios_at_or_above_three_times_the_mean():
    # mean of [1, 1, 1, 13] is 4; 13 >= 12 is dropped, so γ = 1.
    assert trimmed_mean_gamma([1.0, 1.0, 1.0, 13.0]) == 1.0
    # nothing is dropped when all are below 3μ
    assert trimmed_mean_gamma([1.0, 2.0, 3.0]) == 2.0


def test_topk_score_sums_the_k_largest_absolute_entries():
    # ΔW = scale · up · down = 2 · [[1],[−3]] · [[1, 2]] = [[2, 4], [−6, −12]]
    module = lora([[1.0, 2.0]], [[1.0], [-3.0]], scale=2.0)
    delta = module.delta()
    assert torch.equal(delta, torch.tensor([[2.0, 4.0], [-6.0, -12.0]], dtype=torch.float64))
    assert klora.topk_abs_sum(delta.abs(), 1) == 12.0
    assert klora.topk_abs_sum(delta.abs(), 3) == 22.0
    assert klora.topk_abs_sum(delta.abs(), 99) == 24.0


def test_klora_module_scores_use_k_equal_product_of_ranks():
    # subject rank 1, style rank 2 -> K = 2
    subject = lora([[1.0, 0.0, 0.0]], [[3.0], [1.0]])  # ΔW_c = [[3,0,0],[1,0,0]]
    style = lora([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[1.0, 2.0], [0.5, 0.0]])  # [[1,2,0],[0.5,0,0]]
    (score_c, score_s), (l1_c, l1_s) = klora.module_scores([subject, style], subject.rank * style.rank)
    assert (score_c, score_s) == (4.0, 3.0)
    assert (l1_c, l1_s) == (4.0, 3.5)


def test_energy_equals_dense_frobenius_norm_squared():
    generator = torch.Generator().manual_seed(0)
    module = LoraModule(torch.randn(3, 7, generator=generator), torch.randn(5, 3, generator=generator), 0.75)
    assert module.energy() == pytest.approx(float(module.delta().pow(2).sum()), rel=1e-12)
    conv = LoraModule(torch.randn(2, 4, 3, 3, generator=generator), torch.randn(6, 2, 1, 1, generator=generator), 1.5)
    assert conv.energy() == pytest.approx(float(conv.delta().pow(2).sum()), rel=1e-12)


def test_klora_decision_follows_the_formula_on_a_hand_pair():
    # One module; S_c = 4, S_s = 3 (see above), γ from L1 ratio 4 / 3.5 (single module -> trimmed mean = it).
    subject = {"unet.m": lora([[1.0, 0.0, 0.0]], [[3.0], [1.0]])}
    style = {"unet.m": lora([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[1.0, 2.0], [0.5, 0.0]])}
    rule = klora.build(pair_of(subject, style), pattern="s")
    gamma = 4.0 / 3.5
    assert rule.gamma == pytest.approx(gamma)
    # subject iff 4/γ > 3 (1.5 p + 0.5)  <=>  p < (3.5/3 − 0.5) / 1.5
    switch = (3.5 / 3 - 0.5) / 1.5
    assert rule.choose("unet.m", switch - 1e-9) == SUBJECT
    assert rule.choose("unet.m", switch + 1e-9) == STYLE
    assert rule.phases("unet.m") == [(0.0, SUBJECT), (pytest.approx(switch), STYLE)]


def test_klora_s_star_ramp_wraps_and_switches_at_most_twice():
    ramp = klora.PATTERNS["s*"]
    assert ramp(0.0) == pytest.approx(1.275)
    assert ramp(0.15) == pytest.approx(0.0, abs=1e-12)
    assert ramp(0.5) == pytest.approx(0.525)
    assert ramp.pieces() == [(0.0, pytest.approx(0.15), 1.275), (pytest.approx(0.15), 1.0, pytest.approx(-0.225))]
    # level 1.0: style for p < 0.15 (S ≥ 1.275), subject until 1.5 p − 0.225 reaches 1, then style
    rule = SwitchRule(scores={"m": (1.0, 1.0)}, gammas={(0, 1): 1.0}, ramp=ramp)
    assert rule.phases("m") == [(0.0, STYLE), (pytest.approx(0.15), SUBJECT), (pytest.approx(1.225 / 1.5), STYLE)]


@pytest.mark.parametrize("ramp", [Ramp(1.5, 0.5), Ramp(1.5, 1.275, wrap=True), Ramp(0.7, 2.3, wrap=True)])
@pytest.mark.parametrize("level", [0.0, 0.3, 0.9, 1.276, 1.8, 2.4, 5.0])
def test_closed_form_phases_match_the_online_decision_on_a_dense_grid(ramp, level):
    rule = SwitchRule(scores={"m": (level, 1.0)}, gammas={(0, 1): 1.0}, ramp=ramp)
    phases = rule.phases("m")
    for n in range(997):
        p = n / 997
        expected = rule.choose("m", p)
        active = [source for start, source in phases if start <= p][-1]
        assert active == expected, (p, phases)


def test_zero_style_score_means_subject_throughout_and_zero_subject_style_throughout():
    ramp = klora.PATTERNS["s"]
    assert SwitchRule({"m": (1.0, 0.0)}, {(0, 1): 1.0}, ramp).phases("m") == [(0.0, SUBJECT)]
    assert SwitchRule({"m": (0.0, 1.0)}, {(0, 1): 1.0}, ramp).phases("m") == [(0.0, STYLE)]


def test_est_gamma_is_the_trimmed_mean_of_energy_ratios():
    generator = torch.Generator().manual_seed(3)
    subject, style = {}, {}
    for i in range(5):
        subject[f"unet.m{i}"] = LoraModule(torch.randn(2, 6, generator=generator), torch.randn(4, 2, generator=generator), 1.0)
        style[f"unet.m{i}"] = LoraModule(torch.randn(3, 6, generator=generator), torch.randn(4, 3, generator=generator), 0.5)
    rule = est.build(pair_of(subject, style), beta=0.3)
    ratios = [subject[n].energy() / style[n].energy() for n in subject]
    assert rule.gamma == pytest.approx(trimmed_mean_gamma(ratios))
    assert rule.ramp == Ramp(1.5, 0.3)
    name = "unet.m0"
    e_c, e_s = rule.scores[name]
    expected_switch = (e_c / rule.gamma / e_s - 0.3) / 1.5
    phases = rule.phases(name)
    if 0 < expected_switch < 1:
        assert phases[1][0] == pytest.approx(expected_switch)
    else:
        assert len(phases) == 1


def test_klora_global_gamma_is_ratio_of_l1_sums():
    subject = {"unet.a": lora([[1.0]], [[2.0]]), "unet.b": lora([[1.0]], [[10.0]])}
    style = {"unet.a": lora([[1.0]], [[1.0]]), "unet.b": lora([[1.0]], [[2.0]])}
    assert klora.build(pair_of(subject, style), gamma_mode="global").gamma == pytest.approx(12.0 / 3.0)
    assert klora.build(pair_of(subject, style)).gamma == pytest.approx((2.0 + 5.0) / 2)


@pytest.mark.parametrize("shape, rank, k", [((700, 900), 8, 64), ((3000, 400), 16, 256), ((640, 64 * 9), 4, 16)])
def test_fast_topk_score_equals_the_float64_dense_score(shape, rank, k):
    """The tiled float32-candidate path's top-K sum must equal the float64 dense one."""
    generator = torch.Generator().manual_seed(rank)
    module = LoraModule(torch.randn(rank, shape[1], generator=generator),
                        torch.randn(shape[0], rank, generator=generator), 0.37)
    dense = module.delta().abs()
    top, l1 = klora.topk_and_l1(module, k)
    assert top == pytest.approx(klora.topk_abs_sum(dense, k), rel=1e-12)
    assert l1 == pytest.approx(float(dense.sum()), rel=1e-5)
