"""Canonical LoRA data: per module, the factors and scale a standard loader applies (ΔW = scale · up · down)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .names import SgmLayout

SUBJECT = "subject"
STYLE = "style"
SOURCES = (SUBJECT, STYLE)
BOTH = "both"


class Factor(Protocol):
    """A factor kept where it is (a LoRA file) and read on each access, so a merge holds one module's numbers at a
    time; only its shape is known up front."""

    shape: torch.Size

    def load(self) -> torch.Tensor: ...


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


@dataclass(frozen=True)
class LoraPair:
    """The subject and style LoRAs on the same base: which pipeline class, and which component is the denoiser."""

    subject: LoraFile
    style: LoraFile
    denoiser: str
    pipeline_class: str = "StableDiffusionPipeline"
    single_text_encoder: bool = True
    sgm: SgmLayout | None = None  # SDXL: kohya keys are written under SGM UNet names

    def source(self, name: str) -> LoraFile:
        return self.subject if name == SUBJECT else self.style

    @property
    def module_names(self) -> list[str]:
        return sorted(set(self.subject.modules) | set(self.style.modules))

    @property
    def both_adapted(self) -> list[str]:
        """Denoiser modules both LoRAs adapt: the only ones a selection rule decides."""
        prefix = self.denoiser + "."
        return sorted(n for n in set(self.subject.modules) & set(self.style.modules) if n.startswith(prefix))

    def is_denoiser(self, name: str) -> bool:
        return name.startswith(self.denoiser + ".")


def denoiser_name(pipe) -> str:
    """The pipeline component that runs once per denoising step: `unet` (SD, SDXL) or `transformer` (FLUX, SD3)."""
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"
