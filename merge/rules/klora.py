"""K-LoRA (Ouyang et al., CVPR 2025): top-K |ΔW| scores, K = r_c · r_s, an L1 balance γ and the S(p) ramp.

The score is exact. Each entry of ΔW is the float64 sum, in rank order, of the products up[i, j] · down[j, c]
(each exact in float64 for factors of float32 or narrower), times the module's scale; S is the sum of the K largest
|entries|, added exactly (`math.fsum`). That is what a float64 dense ΔW built by rank-1 updates gives, and no other
entry order or summation order changes it.

No dense ΔW is built to find those entries. ΔW is computed in float32, a tile of rows at a time (on `cuda` when
asked; on the CPU 1 MiB, which keeps the matmul's output in cache), and each tile is read once and dropped: its
|entries| add to Σ|ΔW| (γ's L1, taken from the float32 entries: a float32 sum per tile, the tiles' sums added with
`math.fsum`), and only the entries that can still be among the K largest are kept, by a running lower bound on the
K-th largest float32 |entry| (the K-th largest of the group maxima of a tile, then of the kept entries). An entry is
kept while its float32 value reaches that bound less twice `error_bound`, the most a float32 entry can differ from
the exact one; so the kept set provably holds the K largest exact entries, and only those few are recomputed in
float64.
"""

from __future__ import annotations

import math

import numpy
import torch

from ..lora import SOURCES, STYLE, SUBJECT, LoraModule, LoraSet
from .method import ALPHA, BETA, GAMMA_SCALE, Option
from .ramp import Ramp
from .switch import SwitchedMethod, SwitchRule, means, pairing_gammas, ratio, trimmed_mean_gamma

PATTERNS = {"s": Ramp(1.5, 0.5), "s*": Ramp(1.5, 1.275, wrap=True)}

TILE_ENTRIES = {"cpu": 1 << 18, "cuda": 1 << 25}  # float32 entries per tile: 1 MiB stays in a CPU core's L2 cache
GROUPS_PER_K = 4  # before K entries are kept, a tile's entries fall into 4·K groups whose maxima bound its K-th largest
CUT_PER_K = 2  # the kept entries are cut back to the bound whenever they number 2·K
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
    that sum is at most ‖up[i, :]‖ · ‖down[:, c]‖ (Cauchy–Schwarz). The 1 % slack covers the norms' own float32
    rounding, the float64 recompute's error and the threshold's rounding; r · 2⁻¹²⁶ covers float32 underflow.
    """
    rank = up.shape[1]
    unit = 2.0**-24
    inputs = 2 * unit if source_dtype == torch.float64 else 0.0
    if up.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        inputs += 2 * UNIT_ROUNDOFF["high"]
    inputs += 2 * UNIT_ROUNDOFF.get(torch.get_float32_matmul_precision(), 0.0)
    gamma = (rank + 2) * unit / (1 - (rank + 2) * unit) + inputs
    norms = math.sqrt(float(up.square().sum(1).max()) * float(down.square().sum(0).max()))
    return 1.01 * (gamma * norms + rank * 2.0**-126)


def _below(value: float) -> float:
    """The largest float32 no greater than `value`: a threshold that compares exactly with float32 entries and
    cannot round up past one it has to keep."""
    single = numpy.float32(value)
    return float(single if single <= value else numpy.nextafter(single, numpy.float32(-numpy.inf)))


def _kth_largest(values: numpy.ndarray, k: int) -> float:
    return float(numpy.partition(values, values.size - k)[values.size - k])


def _at_least(flat: torch.Tensor, threshold: float) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(values, flat indices) of the entries ≥ threshold. On the CPU through numpy, whose comparison and
    `flatnonzero` on a cached tile take a tenth of torch's `>=` and `nonzero`."""
    if flat.device.type == "cpu":
        array = flat.numpy()
        index = numpy.flatnonzero(array >= threshold)
        return array[index], index
    index = (flat >= threshold).nonzero().squeeze(1)
    return flat[index].cpu().numpy(), index.cpu().numpy()


class Candidates:
    """The float32 |entries| seen so far that can still be among the K largest, with their flat indices.

    `bound` never exceeds the K-th largest float32 |entry| seen: it is the K-th largest of the kept entries once
    there are K of them, before that the K-th largest of a tile's group maxima (each group maximum is an entry).
    The groups are 4·K strided slices of the tile (entries i, i + 4·K, …), so their maxima are one fast reduction
    over the tile's leading dimension; after that a tile costs one comparison with the threshold.
    """

    def __init__(self, k: int, slack: float) -> None:
        self.k, self.slack = k, slack
        self.bound = -math.inf
        self.values = numpy.empty(0, dtype=numpy.float32)
        self.index = numpy.empty(0, dtype=numpy.int64)
        self.pending: list[tuple[numpy.ndarray, numpy.ndarray]] = []
        self.count = 0

    def add(self, tile: torch.Tensor, offset: int) -> None:
        """Keep the entries of a tile of |ΔW| (flat indices from `offset`) that reach the bound less the slack."""
        flat = tile.view(-1)
        groups = min(flat.numel(), GROUPS_PER_K * self.k)
        if self.count < self.k and groups >= self.k:
            maxima = flat[: flat.numel() // groups * groups].view(-1, groups).amax(0).cpu().numpy()
            self.bound = max(self.bound, _kth_largest(maxima, self.k))
        values, index = _at_least(flat, _below(self.bound - self.slack))
        self.pending.append((values.copy(), index + offset))  # the values are a view of the tile, which is reused
        self.count += values.size
        if self.count >= CUT_PER_K * self.k:
            self.cut()

    def cut(self) -> None:
        """Raise the bound to the K-th largest kept entry and drop what falls below it less the slack."""
        if self.pending:
            self.values = numpy.concatenate([self.values, *(values for values, _ in self.pending)])
            self.index = numpy.concatenate([self.index, *(index for _, index in self.pending)])
            self.pending = []
        if self.values.size > self.k:
            self.bound = max(self.bound, _kth_largest(self.values, self.k))
            keep = numpy.flatnonzero(self.values >= _below(self.bound - self.slack))
            self.values, self.index = self.values[keep], self.index[keep]
        self.count = self.values.size


def exact_entries(up: torch.Tensor, down: torch.Tensor, index: numpy.ndarray) -> numpy.ndarray:
    """Entries of up · down at flat indices, in float64: the products (exact) summed in rank order, one
    element-wise addition per rank (each correctly rounded, so the same on any machine). Each rank's factors are
    gathered from one contiguous float64 row, which stays in cache (gathering across rows costs several times more)."""
    up, down = up.flatten(1), down.flatten(1)
    rows, columns = numpy.divmod(index, down.shape[1])
    up = up.T.to(torch.float64, memory_format=torch.contiguous_format).numpy()  # (r, out)
    down = down.to(torch.float64).numpy()  # (r, in)
    entries = up[0].take(rows) * down[0].take(columns)
    for up_row, down_row in zip(up[1:], down[1:]):
        entries += up_row.take(rows) * down_row.take(columns)
    return entries


def topk_abs_sum(values, k: int) -> float:
    """Sum of the k largest of the |ΔW| values (all when k ≥ their count), added exactly: in any order the same."""
    values = numpy.asarray(values, dtype=numpy.float64).ravel()
    if k < values.size:
        values = numpy.partition(values, values.size - k)[values.size - k:]
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
    step = min(rows, max(1, TILE_ENTRIES.get(device.type, TILE_ENTRIES["cuda"]) // cols))
    buffer = (scratch or Scratch()).tile(step, cols, device)
    sums = torch.empty(-(-rows // step), dtype=torch.float32, device=device)  # each tile's Σ|entries|
    for number, start in enumerate(range(0, rows, step)):
        tile = buffer[: min(step, rows - start)]
        torch.mm(up[start:start + step], down, out=tile)
        tile.abs_()
        torch.sum(tile.view(-1), 0, out=sums[number])
        candidates.add(tile, start * cols)
    candidates.cut()
    l1 = math.fsum(sums.tolist())
    entries = exact_entries(up_source, down_source, candidates.index)
    return topk_abs_sum(numpy.abs(entries * lora.scale), k), l1 * abs(lora.scale)


def module_scores(
    modules: list[LoraModule | None], k: int, device="cpu", scratch: Scratch | None = None
) -> tuple[tuple[float | None, ...], tuple[float | None, ...]]:
    """(top-K scores, L1 masses) of one decided module, per source (None where a source does not adapt it)."""
    scored = [None if module is None else topk_and_l1(module, k, device, scratch) for module in modules]
    return (tuple(None if s is None else s[0] for s in scored), tuple(None if s is None else s[1] for s in scored))


def top_k(loras: LoraSet, name: str) -> int:
    """K = r_c · r_s, with several subjects (styles) the largest subject (style) rank at the layer."""
    def rank(role: str) -> int:
        return max(loras.sources[i].lora.modules[name].rank for i in loras.indices(role)
                   if name in loras.sources[i].lora.modules)
    return rank(SUBJECT) * rank(STYLE)


def build(
    loras: LoraSet,
    pattern: str = "s",
    alpha: float | None = None,
    beta: float | None = None,
    gamma_mode: str = "trimmed",
    device: str | None = None,
    progress=iter,
) -> SwitchRule:
    """The K-LoRA switch; α, β default to the pattern's published values."""
    default = PATTERNS[pattern]
    ramp = Ramp(default.alpha if alpha is None else alpha, default.beta if beta is None else beta, default.wrap)
    scores, l1, scratch = {}, {}, Scratch()
    switched = [i if source.role in SOURCES else None for i, source in enumerate(loras.sources)]
    for name in progress(loras.decided):
        modules = [None if i is None else loras.sources[i].lora.modules.get(name) for i in switched]
        scores[name], l1[name] = module_scores(modules, top_k(loras, name), device or "cpu", scratch)
    roles = tuple(source.role for source in loras.sources)
    if gamma_mode == "global":
        def gamma(values):
            return ratio(sum(c for c, _ in values), sum(s for _, s in values))
    else:
        def gamma(values):
            return trimmed_mean_gamma([ratio(c, s) for c, s in values])
    norms = None if loras.is_pair else means(l1, len(roles))
    return SwitchRule(scores=scores, gammas=pairing_gammas(l1, roles, gamma), ramp=ramp, roles=roles, norms=norms)


class KLoraMethod(SwitchedMethod):
    name = "klora"
    summary = "K-LoRA: top-K |ΔW| scores, an L1 balance γ and the S(p) ramp (CVPR 2025)."
    options = (
        Option("pattern", tuple(PATTERNS), "K-LoRA ramp.", default="s"),
        ALPHA, BETA,
        Option("gamma_mode", ("trimmed", "global"), "K-LoRA balance γ: trimmed mean of per-layer L1 ratios (code) "
               "or ratio of sums (paper).", default="trimmed", flag="--gamma"),
        GAMMA_SCALE,
    )

    def switch(self, loras: LoraSet, settings, device: str | None, progress) -> tuple[SwitchRule, dict]:
        rule = build(loras, settings.pattern, settings.alpha, settings.beta, settings.gamma_mode, device, progress)
        return rule, {"pattern": settings.pattern, "gamma_mode": settings.gamma_mode}

    def wraps(self, params: dict) -> bool:
        return params.get("pattern") == "s*"


METHOD = KLoraMethod()
