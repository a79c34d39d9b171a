"""NP-LoRA (Chen et al., arXiv 2511.11051): the content delta, softly projected away from the style's principal input
directions, plus the style delta untouched:

    ΔW = ΔW_s + ΔW_c (I − μ/(1+μ) · V_k V_kᵀ)

V_k: the top k right singular vectors of ΔW_s (input space, ΔW being out × in and applied as ΔW·x; the paper's
hard projection, its implementation notes and its ablation all act on this side), k = all of them by default (the
style's whole row space, as the paper does with rank-8 LoRAs). μ = 0.5 by default; μ = 0 is direct addition,
μ → ∞ the hard projection. With several styles ΔW_s is their sum, and every subject is projected.

Static and exact, and still a LoRA: only each subject's down factor changes, A_c ← A_c − c·(A_c V_k) V_kᵀ, so the
content stays rank r_c. V_k comes from the factors (a QR of the stacked style downs and an SVD of an r × r-sized
core), never from a dense SVD; a layer's projected factor is made when the exporter asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..lora import STYLE, SUBJECT, LoraModule, LoraSet, factor_svd
from ..schedule import REFERENCE_STEPS
from .direct import DirectRule, fixed_from_file
from .method import Method, Option, ParamsCheck, RuleOptions, count, finite

DEFAULT_MU = 0.5
RANK_TOLERANCE = 1e-12  # singular values below this share of the largest span no direction of ΔW_s


def style_directions(styles: list[LoraModule], directions: int | None = None) -> torch.Tensor:
    """V_k of ΔW_s = Σ scale·up·down, as (in·kh·kw, k) float64 columns, largest singular value first."""
    down = torch.cat([module.down.flatten(1).to(torch.float64) for module in styles], 0)
    up = torch.cat([module.up.flatten(1).to(torch.float64) * module.scale for module in styles], 1)
    _, values, right = factor_svd(up, down)
    kept = int((values > RANK_TOLERANCE * values.max()).sum()) if values.numel() and values.max() > 0 else 0
    k = kept if directions is None else min(directions, kept)
    return right[:, :k]


@dataclass(frozen=True)
class ProjectedDown:
    """A subject's down factor with the styles' directions partly projected out, computed on each `load`."""

    content: LoraModule
    styles: tuple[LoraModule, ...]
    strength: float  # μ / (1 + μ)
    directions: int | None

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.content.down_shape)

    def load(self) -> torch.Tensor:
        down = self.content.down
        flat = down.flatten(1).to(torch.float64)
        basis = style_directions(list(self.styles), self.directions)
        projected = flat - self.strength * (flat @ basis) @ basis.T
        return projected.reshape(down.shape).to(torch.promote_types(down.dtype, torch.float32))


def project(loras: LoraSet, mu: float = DEFAULT_MU, directions: int | None = None) -> LoraSet:
    """The set with every subject's decided modules projected (their ups and scales unchanged)."""
    styles = loras.indices(STYLE)
    sources = list(loras.sources)
    for index in loras.indices(SUBJECT):
        lora = sources[index].lora
        modules = dict(lora.modules)
        for name in loras.decided:
            if name in modules:
                layer_styles = tuple(loras.sources[j].lora.modules[name] for j in styles
                                     if name in loras.sources[j].lora.modules)
                content = modules[name]
                down = ProjectedDown(content, layer_styles, mu / (1 + mu), directions)
                modules[name] = content.replaced(down=down)
        sources[index] = replace(sources[index], lora=replace(lora, modules=modules))
    return replace(loras, sources=tuple(sources))


class NpLoraMethod(Method):
    name = "np-lora"
    summary = "NP-LoRA: each subject projected off the styles' directions, then merged directly (2025)."
    options = (
        Option("mu", float, f"np-lora: projection strength μ ≥ 0 (default {DEFAULT_MU}).", default=DEFAULT_MU,
               problem=lambda mu: None if finite(mu) and mu >= 0 else "must be a non-negative finite number"),
        Option("directions", int, "np-lora: style singular directions k projected out (default: all).",
               problem=lambda k: None if k >= 1 else "need at least 1"),
    )
    numbers = ("mu",)

    def prepare(self, loras: LoraSet, options: RuleOptions) -> LoraSet:
        settings = self.settings(options)
        return project(loras, settings.mu, settings.directions)

    def build(self, loras: LoraSet, options: RuleOptions, device: str | None = None, progress=iter,
              steps: int = REFERENCE_STEPS) -> tuple[DirectRule, dict]:
        settings = self.settings(options)
        return DirectRule.of(loras), {"mu": settings.mu, "directions": settings.directions}

    def check_params(self, params: dict, roles: tuple[str, ...], check: ParamsCheck) -> None:
        if not (params["mu"] >= 0 and (params.get("directions") is None or count(params["directions"]))):
            check.fail(f"has mu {params['mu']!r} or directions {params.get('directions')!r} out of range")

    def rule_from_file(self, scheduled) -> DirectRule:
        return fixed_from_file(scheduled)


METHOD = NpLoraMethod()
