"""The output rank (`--rank R`, `--rank energy:F`): each source's delta per layer re-factorised by a truncated SVD
computed from its factors, never from a dense SVD of the layer.

For ΔW = up · down (rank r), `lora.factor_svd` gives ΔW's own SVD U Σ Vᵀ from a thin QR of downᵀ and the SVD of
the out × r matrix up Rᵀ (np-lora's style directions come from the same); the best rank-k ΔW is (U_k Σ_k)(V_k)ᵀ.
`R` keeps at most R singular values; `energy:F` the fewest whose squares reach F of the total. A layer whose rank is already within the
request keeps its factors untouched, so a request at or above every layer's rank changes nothing, not even the
file's bytes (the request is recorded, `params.rank`, only when it re-factorised a layer). The error of a
layer is the relative Frobenius norm of what was dropped, √(Σ dropped σ²) / ‖ΔW‖.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .errors import LoraschedError
from .lora import LoraModule, LoraSet, factor_svd


@dataclass(frozen=True)
class RankRequest:
    """At most `rank` per source and layer, or the fewest singular values holding `energy` of it."""

    rank: int | None = None
    energy: float | None = None

    @classmethod
    def parse(cls, text: str) -> RankRequest:
        """`32` or `energy:0.99`."""
        kind, sep, value = text.partition(":")
        try:
            if sep and kind == "energy":
                energy = float(value)
                if not 0 < energy <= 1:
                    raise LoraschedError(f"--rank {text}: the energy must be in (0, 1]")
                return cls(energy=energy)
            if not sep:
                rank = int(text)
                if rank < 1:
                    raise LoraschedError(f"--rank {text}: need at least 1")
                return cls(rank=rank)
        except ValueError:
            pass
        raise LoraschedError(f"--rank {text!r}: give a whole number (32) or energy:F with F in (0, 1] (energy:0.99)")

    def __str__(self) -> str:
        return str(self.rank) if self.rank is not None else f"energy:{self.energy:g}"

    def keep(self, values: torch.Tensor) -> int:
        """How many of the descending singular values to keep."""
        if self.rank is not None:
            return min(self.rank, len(values))
        squares = values.double() ** 2
        share = torch.cumsum(squares, 0) / squares.sum().clamp_min(torch.finfo(torch.float64).tiny)
        return min(int((share < self.energy - 1e-12).sum()) + 1, len(values))


def truncated(module: LoraModule, request: RankRequest | None, cap: int | None = None) -> tuple[LoraModule, float]:
    """The module re-factorised at the request's rank (and at most `cap`), and the relative error; itself (error 0)
    when it already fits."""
    fits = request is None or (request.rank is not None and module.rank <= request.rank)
    if fits and (cap is None or module.rank <= cap):
        return module, 0.0
    down, up = module.down, module.up
    left, values, right = factor_svd(up.flatten(1).to(torch.float64), down.flatten(1).to(torch.float64))
    keep = len(values) if request is None else request.keep(values)
    keep = keep if cap is None else min(keep, cap)
    if keep == module.rank:
        return module, 0.0
    total = float((values**2).sum())
    error = math.sqrt(float((values[keep:] ** 2).sum()) / total) if total > 0 else 0.0
    dtype = torch.promote_types(down.dtype, torch.float32)
    new_up = (left[:, :keep] * values[:keep]).to(dtype)
    new_down = right[:, :keep].T.to(dtype)
    new_up = new_up.reshape(up.shape[0], keep, *up.shape[2:]).contiguous()
    new_down = new_down.reshape(keep, *down.shape[1:]).contiguous()
    return LoraModule(new_down, new_up, module.scale), error


@dataclass(frozen=True)
class Reduced:
    """What `reduce` did: per module name, each source's kept rank and relative error (sources it does not
    adapt: rank 0, error 0)."""

    request: RankRequest | None  # None: only converted LyCORIS layers were capped
    ranks: dict[str, list[int]]
    errors: dict[str, list[float]]
    changed: bool  # some layer was re-factorised (else the set is the one read, and so is the file)

    def record(self) -> dict:
        """What the file records (`params.rank`)."""
        worst = max((max(errors) for errors in self.errors.values()), default=0.0)
        return {"request": None if self.request is None else str(self.request), "max_error": worst,
                "errors": {name: errors for name, errors in sorted(self.errors.items()) if any(errors)}}


def worth_storing(module: LoraModule) -> int:
    """The most rank a converted input keeps exactly: half of min(out, in·kh·kw); beyond, a dense delta is smaller."""
    return max(min(module.up_shape[0], math.prod(module.down_shape[1:])) // 2, 1)


def reduce(loras: LoraSet, request: RankRequest | None, max_error: float | None = None) -> tuple[LoraSet, Reduced]:
    """The set with every source's modules at the requested rank, and the layers of converted LyCORIS inputs whose
    exact rank exceeds what is worth storing (`worth_storing`) truncated there; `max_error` refuses a layer that
    loses more. Sources neither applies to are not looked at."""
    if request is not None and request.rank is not None:
        largest = max(module.rank for source in loras.sources for module in source.lora.modules.values())
        if request.rank > largest:
            raise LoraschedError(f"--rank {request.rank}: above every layer's rank (the largest is {largest}); it "
                                 "would change nothing")
    names = sorted({name for source in loras.sources for name in source.lora.modules})
    ranks = {name: [0] * len(loras.sources) for name in names}
    errors = {name: [0.0] * len(loras.sources) for name in names}
    sources, changed = [], False
    for index, source in enumerate(loras.sources):
        if request is None and source.lora.family is None:
            sources.append(source)
            continue
        modules = {}
        for name, module in source.lora.modules.items():
            cap = worth_storing(module) if source.lora.family is not None else None
            modules[name], errors[name][index] = truncated(module, request, cap)
            ranks[name][index] = modules[name].rank
            changed |= modules[name] is not module
            if max_error is not None and errors[name][index] > max_error:
                shown = "" if request is None else f" at --rank {request}"
                raise LoraschedError(f"{source.lora.path}: {name}{shown} loses {errors[name][index]:.2%} of its "
                                     f"delta, above --max-error {max_error:g}")
        sources.append(replace(source, lora=replace(source.lora, modules=modules)))
    return replace(loras, sources=tuple(sources)), Reduced(request, ranks, errors, changed)
