"""K-LoRA (Ouyang et al., CVPR 2025): top-K |ΔW| scores, K = r_c · r_s, an L1 balance γ and the S(p) ramp."""

from __future__ import annotations

from ..lora import LoraModule, LoraPair
from .ramp import Ramp
from .switch import SwitchRule, ratio, trimmed_mean_gamma

PATTERNS = {"s": Ramp(1.5, 0.5), "s*": Ramp(1.5, 1.275, wrap=True)}


def topk_abs_sum(delta_abs, k: int) -> float:
    """Sum of the k largest entries of |ΔW| (all of them when k ≥ the entry count)."""
    flat = delta_abs.flatten()
    if k >= flat.numel():
        return float(flat.sum())
    return float(flat.topk(k, sorted=False).values.sum())


def module_scores(
    subject: LoraModule, style: LoraModule, device: str | None = None
) -> tuple[tuple[float, float], tuple[float, float]]:
    """((top-K score c, top-K score s), (L1 c, L1 s)) for one both-adapted module, in float64."""
    k = subject.rank * style.rank
    abs_c, abs_s = subject.delta(device=device).abs_(), style.delta(device=device).abs_()
    return (topk_abs_sum(abs_c, k), topk_abs_sum(abs_s, k)), (float(abs_c.sum()), float(abs_s.sum()))


def build(
    pair: LoraPair,
    pattern: str = "s",
    alpha: float | None = None,
    beta: float | None = None,
    gamma_mode: str = "trimmed",
    device: str | None = None,
    progress=iter,
) -> SwitchRule:
    """The K-LoRA switch for a pair; α, β default to the pattern's published values."""
    default = PATTERNS[pattern]
    ramp = Ramp(default.alpha if alpha is None else alpha, default.beta if beta is None else beta, default.wrap)
    scores, l1 = {}, {}
    for name in progress(pair.both_adapted):
        scores[name], l1[name] = module_scores(pair.subject.modules[name], pair.style.modules[name], device)
    if gamma_mode == "global":
        gamma = ratio(sum(c for c, _ in l1.values()), sum(s for _, s in l1.values()))
    else:
        gamma = trimmed_mean_gamma([ratio(c, s) for c, s in l1.values()])
    return SwitchRule(scores=scores, gamma=gamma, ramp=ramp)
