"""Canonical LoRA data: per module, the factors and scale a standard loader applies (ΔW = scale · up · down)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .errors import LoraschedError
from .names import SgmLayout

SUBJECT = "subject"
STYLE = "style"
STATIC = "static"
SOURCES = (SUBJECT, STYLE)
ROLES = (SUBJECT, STYLE, STATIC)
BOTH = "both"


class Factor(Protocol):
    """A factor kept where it is (a LoRA file) and read on each access, so a merge holds one module's numbers at a
    time; only its shape is known up front."""

    shape: torch.Size

    def load(self) -> torch.Tensor: ...


def factor_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of ΔW = up · down (2-D, float64) from its factors, never the dense ΔW: (U, σ, V) with
    ΔW = U diag(σ) Vᵀ. downᵀ = Q R, so ΔW = (up Rᵀ) Qᵀ and only up Rᵀ (out × r) is decomposed."""
    basis, triangle = torch.linalg.qr(down.T)
    left, values, right = torch.linalg.svd(up @ triangle.T, full_matrices=False)
    return left, values, basis @ right.T


class LoraModule:
    """One adapted module: `down` is (r, in[, kh, kw]), `up` is (out, r[, 1, 1]), ΔW = scale · up · down.

    Each factor is a tensor, or a `Factor` read again on every access of `down`/`up` (take it once per use).
    """

    __slots__ = ("_down", "_up", "scale")

    def __init__(self, down: torch.Tensor | Factor, up: torch.Tensor | Factor, scale: float) -> None:
        self._down, self._up, self.scale = down, up, scale

    def __repr__(self) -> str:
        return f"LoraModule(down={tuple(self._down.shape)}, up={tuple(self._up.shape)}, scale={self.scale})"

    @property
    def down(self) -> torch.Tensor:
        return self._down if isinstance(self._down, torch.Tensor) else self._down.load()

    @property
    def up(self) -> torch.Tensor:
        return self._up if isinstance(self._up, torch.Tensor) else self._up.load()

    def replaced(self, down: torch.Tensor | Factor | None = None, scale: float | None = None) -> LoraModule:
        """The same module with another down factor or scale (the up factor stays where it is)."""
        return LoraModule(self._down if down is None else down, self._up, self.scale if scale is None else scale)

    @property
    def down_shape(self) -> tuple[int, ...]:
        return tuple(self._down.shape)

    @property
    def up_shape(self) -> tuple[int, ...]:
        return tuple(self._up.shape)

    @property
    def rank(self) -> int:
        return self._down.shape[0]

    def delta(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
        """The dense ΔW as a matrix (out, in·kh·kw); only rules that need every entry (K-LoRA top-K) call it."""
        up = self.up.flatten(1).to(device=device, dtype=dtype)
        return self.scale * (up @ self.down.flatten(1).to(device=device, dtype=dtype))

    def energy(self) -> float:
        """‖ΔW‖_F² through the Gram identity ((BᵀB) ∘ (AAᵀ)).sum(), without forming ΔW."""
        a = self.down.flatten(1).to(torch.float64)
        b = self.up.flatten(1).to(torch.float64)
        return float(self.scale**2 * ((b.T @ b) * (a @ a.T)).sum())


@dataclass(frozen=True)
class LoraFile:
    """A LoRA read onto a base: module names are `<component>.<module path>` as in the diffusers pipeline."""

    path: str
    sha256: str
    dtype: torch.dtype
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    family: str | None = None  # the LyCORIS family its factors were converted from (merge/lycoris.py), if any


Selection = tuple[int, ...]  # the sources active in a layer, by index into `LoraSet.sources`, ascending


@dataclass(frozen=True)
class Source:
    """One input LoRA with its role: `subject` and `style` sources are selected among; `static` ones stay on in
    every layer they adapt. `strength` already multiplies the modules' scales."""

    lora: LoraFile
    role: str = SUBJECT
    strength: float = 1.0


@dataclass(frozen=True)
class LoraSet:
    """The input LoRAs on one base, in command-line order: which pipeline class, and which component denoises."""

    sources: tuple[Source, ...]
    denoiser: str
    pipeline_class: str = "StableDiffusionPipeline"
    single_text_encoder: bool = True
    sgm: SgmLayout | None = None  # SDXL: kohya keys are written under SGM UNet names

    @classmethod
    def pair(cls, subject: LoraFile, style: LoraFile, **kwargs) -> LoraSet:
        return cls(sources=(Source(subject, SUBJECT), Source(style, STYLE)), **kwargs)

    def indices(self, role: str) -> Selection:
        return tuple(i for i, source in enumerate(self.sources) if source.role == role)

    def adapting(self, name: str) -> Selection:
        """The sources that adapt module `name`."""
        return tuple(i for i, source in enumerate(self.sources) if name in source.lora.modules)

    def switched(self, name: str) -> Selection:
        """The subjects and styles that adapt module `name`: what a rule selects among there."""
        return tuple(i for i in self.adapting(name) if self.sources[i].role != STATIC)

    @property
    def module_names(self) -> list[str]:
        return sorted(set().union(*(source.lora.modules for source in self.sources)))

    @property
    def denoiser_modules(self) -> list[str]:
        """Denoiser modules a subject or a style adapts: what the time-based methods (switch, windows) act on."""
        return [name for name in self.module_names if self.is_denoiser(name) and self.switched(name)]

    @property
    def decided(self) -> list[str]:
        """Denoiser modules at least one subject and one style adapt: the only ones a selection rule decides."""
        prefix = self.denoiser + "."
        subjects = set().union(*(self.sources[i].lora.modules for i in self.indices(SUBJECT)))
        styles = set().union(*(self.sources[i].lora.modules for i in self.indices(STYLE)))
        return sorted(n for n in subjects & styles if n.startswith(prefix))

    def is_denoiser(self, name: str) -> bool:
        return name.startswith(self.denoiser + ".")

    @property
    def is_pair(self) -> bool:
        """One subject then one style and nothing else: what the calibrated rules (feature-kl) select between."""
        return tuple(source.role for source in self.sources) == SOURCES

    @property
    def subject(self) -> LoraFile:
        return self.source(SUBJECT)

    @property
    def style(self) -> LoraFile:
        return self.source(STYLE)

    def source(self, role: str) -> LoraFile:
        """The one LoRA of a role, in a pair."""
        if not self.is_pair:
            raise LoraschedError("only a subject/style pair has one LoRA per role")
        return self.sources[SOURCES.index(role)].lora

    def selection(self, choice: str) -> Selection:
        """A pair rule's choice (subject, style or both) as the sources it switches on."""
        return PAIR_SELECTIONS[choice]


PAIR_SELECTIONS = {SUBJECT: (0,), STYLE: (1,), BOTH: (0, 1)}


def denoiser_name(pipe) -> str:
    """The pipeline component that runs once per denoising step: `unet` (SD, SDXL) or `transformer` (FLUX, SD3)."""
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"
