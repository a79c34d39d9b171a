"""K-LoRA (Ouyang et al., CVPR 2025): top-K |ΔW| scores, K = r_c · r_s, an L1 balance γ and the S(p) ramp."""

from __future__ import annotations

import torch

from ..lora import LoraModule, LoraPair
from .ramp import Ramp
from .switch import SwitchRule, ratio, trimmed_mean_gamma

PATTERNS = {"s": Ramp(1.5, 0.5), "s*": Ramp(1.5, 1.275, wrap=True)}


EXACT_BELOW = 1 << 18  # modules with fewer ΔW entries are scored on a float64 dense ΔW directly
MARGIN = 1e-3  # relative slack on the float32 candidate cut, far above float32 rounding of an entry


def topk_abs_sum(delta_abs: torch.Tensor, k: int) -> float:
    """Sum of the k largest entries of |ΔW| (all of them when k ≥ the entry count)."""
    flat = delta_abs.flatten()
    if k >= flat.numel():
        return float(flat.sum())
    return float(flat.topk(k, sorted=False).values.sum())


class Scratch:
    """One reusable float32 buffer for dense ΔW: allocating a fresh 50 MB matrix per module costs more than the
    matmul that fills it."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def matrix(self, rows: int, cols: int, device) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < rows * cols or self.buffer.device != torch.device(device):
            self.buffer = torch.empty(rows * cols, dtype=torch.float32, device=device)
        return self.buffer[: rows * cols].view(rows, cols)


def topk_and_l1(lora: LoraModule, k: int, device="cpu", scratch: Scratch | None = None) -> tuple[float, float]:
    """(sum of the k largest |ΔW| entries, Σ|ΔW|) for one LoRA module.

    Small modules: a float64 dense ΔW. Large ones: ΔW in float32 finds a candidate set that provably holds the
    top k (every entry ≥ the k-th largest of 4k block maxima, less a margin), whose entries are then recomputed
    exactly in float64, so the top-K score is float64-exact; Σ|ΔW| (used for γ only) sums the float32 entries.
    """
    up, down = lora.up.flatten(1), lora.down.flatten(1)
    rows, cols = up.shape[0], down.shape[1]
    scale = abs(lora.scale)
    if rows * cols <= max(EXACT_BELOW, k):
        dense = lora.delta(torch.float64, device).abs_()
        return topk_abs_sum(dense, k), float(dense.sum())
    dense = (scratch or Scratch()).matrix(rows, cols, device)
    torch.mm(up.to(device, torch.float32), down.to(device, torch.float32), out=dense)
    flat = dense.abs_().view(-1)
    l1 = float(flat.sum()) * scale
    blocks = min(flat.numel(), 4 * k)
    width = flat.numel() // blocks
    body = flat[: blocks * width].view(blocks, width)
    maxima = body.amax(1)
    cut = float(maxima.topk(k, sorted=False).values.min()) * (1 - MARGIN)
    if cut <= 0:
        dense = lora.delta(torch.float64, device).abs_()
        return topk_abs_sum(dense, k), l1
    rows = (maxima >= cut).nonzero().squeeze(1)  # only blocks whose maximum reaches the cut can hold candidates
    hits = (body[rows] >= cut).nonzero()
    tail = (flat[blocks * width :] >= cut).nonzero().squeeze(1) + blocks * width
    index = torch.cat([rows[hits[:, 0]] * width + hits[:, 1], tail])
    up64, down64 = up.to(device, torch.float64), down.to(device, torch.float64)
    exact = (up64[index // cols] * down64[:, index % cols].T).sum(1).abs_()
    return float(exact.topk(k, sorted=False).values.sum()) * scale, l1


def module_scores(
    subject: LoraModule, style: LoraModule, device="cpu", scratch: Scratch | None = None
) -> tuple[tuple[float, float], tuple[float, float]]:
    """((top-K score c, top-K score s), (L1 c, L1 s)) for one both-adapted module, K = r_c · r_s."""
    k = subject.rank * style.rank
    top_c, l1_c = topk_and_l1(subject, k, device, scratch)
    top_s, l1_s = topk_and_l1(style, k, device, scratch)
    return (top_c, top_s), (l1_c, l1_s)


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
    scores, l1, scratch = {}, {}, Scratch()
    for name in progress(pair.both_adapted):
        subject, style = pair.subject.modules[name], pair.style.modules[name]
        scores[name], l1[name] = module_scores(subject, style, device or "cpu", scratch)
    if gamma_mode == "global":
        gamma = ratio(sum(c for c, _ in l1.values()), sum(s for _, s in l1.values()))
    else:
        gamma = trimmed_mean_gamma([ratio(c, s) for c, s in l1.values()])
    return SwitchRule(scores=scores, gamma=gamma, ramp=ramp)
