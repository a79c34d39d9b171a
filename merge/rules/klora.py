"""K-LoRA (Ouyang et al., CVPR 2025): top-K |ΔW| scores, K = r_c · r_s, an L1 balance γ and the S(p) ramp.

The score is exact. Each entry of ΔW is the float64 sum, in rank order, of the products up[i, j] · down[j, c]
(each exact in float64 for factors of float32 or narrower), times the module's scale; S is the sum of the K largest
|entries|, added exactly (`math.fsum`). That is what a float64 dense ΔW built by rank-1 updates gives, and no other
entry order or summation order changes it.

No dense ΔW is built to find those entries. ΔW is computed in float32, a tile of rows at a time (on `cuda` when
asked), and each tile is read once and dropped: its |entries| add to Σ|ΔW| (γ's L1, taken from the float32 entries),
and only the entries that can still be among the K largest are kept, by a running lower bound on the K-th largest
float32 |entry| (the K-th largest of the group maxima of a tile, then of the kept entries). An entry is kept while
its float32 value reaches that bound less twice `error_bound`, the most a float32 entry can differ from the exact
one; so the kept set provably holds the K largest exact entries, and only those few are recomputed in float64.
"""

from __future__ import annotations

import math

import torch

from ..lora import LoraModule, LoraPair
from .ramp import Ramp
from .switch import SwitchRule, ratio, trimmed_mean_gamma

PATTERNS = {"s": Ramp(1.5, 0.5), "s*": Ramp(1.5, 1.275, wrap=True)}

TILE_ENTRIES = {"cpu": 1 << 21, "cuda": 1 << 25}  # float32 entries per tile: 8 MiB stays in a CPU's L3 cache
GROUPS_PER_K = 4  # a tile's entries fall into 4·K groups whose maxima bound its K-th largest entry
UNIT_ROUNDOFF = {"highest": 0.0, "high": 2.0**-11, "medium": 2.0**-8}  # input rounding of a float32 matmul (TF32, bf16)


class Scratch:
    """One reusable float32 tile buffer per device: allocating a fresh one per module costs more than filling it."""

    def __init__(self) -> None:
        self.buffers: dict[torch.device, torch.Tensor] = {}

    def tile(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        buffer = self.buffers.get(device)
        if buffer is None or buffer.numel() < rows * cols:
            buffer = self.buffers[device] = torch.empty(rows * cols, dtype=torch.float32, device=device)
        return buffer[: rows * cols].view(rows, cols)


def error_bound(up: torch.Tensor, down: torch.Tensor, source_dtype: torch.dtype) -> float:
    """A bound on |float32 entry − exact entry| over the whole ΔW = up · down (unscaled).

    Each entry's float32 error is at most γ_(r+2) · Σ_j |up[i, j] · down[j, c]| (r products summed, inputs rounded
    to float32 when wider), plus the matmul's own input rounding when float32 matmuls may use TF32 or bf16, and
    that sum is at most ‖up[i, :]‖ · ‖down[:, c]‖ (Cauchy–Schwarz). 1 % slack covers the bound's own rounding,
    the float64 recompute's error and the threshold's rounding; r · 2⁻¹²⁶ covers float32 underflow.
    """
    rank = up.shape[1]
    unit = 2.0**-24
    inputs = 2 * unit if source_dtype == torch.float64 else 0.0
    if up.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        inputs += 2 * UNIT_ROUNDOFF["high"]
    inputs += 2 * UNIT_ROUNDOFF.get(torch.get_float32_matmul_precision(), 0.0)
    gamma = (rank + 2) * unit / (1 - (rank + 2) * unit) + inputs
    norms = float(up.double().norm(dim=1).max()) * float(down.double().norm(dim=0).max())
    return 1.01 * (gamma * norms + rank * 2.0**-126)


def _below(value: float) -> torch.Tensor:
    """`value` as a float32 no greater than it (a threshold must not round up past an entry it has to keep)."""
    single = torch.tensor(value, dtype=torch.float32)
    if float(single) > value:
        single = torch.nextafter(single, torch.tensor(-math.inf))
    return single


class Candidates:
    """The float32 |entries| seen so far that can still be among the K largest, with their flat indices.

    `bound` never exceeds the K-th largest float32 |entry| seen: it is the K-th largest of the kept entries once
    there are K of them, before that the K-th largest of a tile's group maxima (each group maximum is an entry).
    """

    def __init__(self, k: int, slack: float) -> None:
        self.k, self.slack = k, slack
        self.bound = -math.inf
        self.values = torch.empty(0)
        self.index = torch.empty(0, dtype=torch.int64)

    def threshold(self) -> torch.Tensor:
        return _below(self.bound - self.slack)

    def add(self, tile: torch.Tensor, offset: int) -> None:
        """Keep the entries of a tile of |ΔW| (flat indices from `offset`) that reach the bound less the slack."""
        flat = tile.view(-1)
        groups = self.k * GROUPS_PER_K
        values, index = [self.values.to(flat.device)], [self.index.to(flat.device)]
        rest = flat
        if flat.numel() >= groups:
            body = flat[: flat.numel() // groups * groups].view(-1, groups)
            maxima = body.amax(0)  # group g holds entries g, g + groups, …: a reduction over contiguous rows
            if self.values.numel() < self.k:
                self.bound = max(self.bound, float(maxima.topk(self.k, sorted=False).values.min()))
            columns = (maxima >= self.threshold()).nonzero().squeeze(1)
            rows, picked = (body[:, columns] >= self.threshold()).nonzero().unbind(1)
            values.append(body[rows, columns[picked]])
            index.append(offset + rows * groups + columns[picked])
            rest, offset = flat[body.numel():], offset + body.numel()
        hit = (rest >= self.threshold()).nonzero().squeeze(1)
        values.append(rest[hit])
        index.append(offset + hit)
        self._cut(torch.cat(values), torch.cat(index))

    def _cut(self, values: torch.Tensor, index: torch.Tensor) -> None:
        """Raise the bound to the K-th largest kept entry and drop what falls below it less the slack."""
        if values.numel() > self.k:
            self.bound = max(self.bound, float(values.topk(self.k, sorted=False).values.min()))
            keep = values >= self.threshold()
            values, index = values[keep], index[keep]
        self.values, self.index = values, index


def exact_entries(up: torch.Tensor, down: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Entries of up · down at flat indices, in float64: the products (exact) summed in rank order."""
    up, down = up.to(torch.float64), down.to(torch.float64)
    products = (up[index // down.shape[1]] * down.T[index % down.shape[1]]).T.contiguous()
    entries = products[0].clone()
    for row in products[1:]:
        entries += row
    return entries


def topk_abs_sum(values: torch.Tensor, k: int) -> float:
    """Sum of the k largest of the |ΔW| values (all when k ≥ their count), added exactly: in any order the same."""
    values = values.flatten()
    if k < values.numel():
        values = values.topk(k, sorted=False).values
    return math.fsum(values.tolist())


def topk_and_l1(lora: LoraModule, k: int, device="cpu", scratch: Scratch | None = None) -> tuple[float, float]:
    """(sum of the k largest |ΔW| entries, Σ|ΔW|) for one LoRA module; see the module docstring."""
    device = torch.device(device)
    down_source, up_source = lora.down, lora.up
    up = up_source.flatten(1).to(device, torch.float32)
    down = down_source.flatten(1).to(device, torch.float32)
    rows, cols = up.shape[0], down.shape[1]
    source_dtype = torch.promote_types(up_source.dtype, down_source.dtype)
    candidates = Candidates(k, 2 * error_bound(up, down, source_dtype))
    l1 = torch.zeros((), dtype=torch.float64, device=device)
    step = max(1, TILE_ENTRIES.get(device.type, TILE_ENTRIES["cuda"]) // cols)
    scratch = scratch or Scratch()
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        tile = scratch.tile(stop - start, cols, device)
        torch.mm(up[start:stop], down, out=tile)
        tile.abs_()
        l1 += tile.sum()
        candidates.add(tile, start * cols)
    index = candidates.index
    entries = exact_entries(up_source.flatten(1).to(device), down_source.flatten(1).to(device), index)
    return topk_abs_sum((entries * lora.scale).abs_(), k), float(l1) * abs(lora.scale)


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
