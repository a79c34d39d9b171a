"""feature-kl: lorasched's precise form of the dynamic feature fusion of Cao et al. (arXiv 2602.15539).

At a both-adapted layer with base output h0 = W0 x and LoRA outputs d_k = ΔW_k x (from the factors, never a
dense ΔW), each token's channels become a distribution P = softmax(h / (τ · rms(h0))), with the same per-token
scale for all three so only the LoRA's change moves it. The divergence of LoRA k is D_k = mean over tokens of
KL(P_{h0+d_k} ‖ P_{h0}): how far that LoRA pulls this layer's features, for this input, away from the base.
The layer takes the LoRA that pulls further after balancing: subject iff D_c > γ · D_s (ties go to style, as in
K-LoRA). γ is the geometric mean of D_c / D_s over a balance run (both LoRAs applied, every layer and step), so
a LoRA that is simply larger does not win everywhere. Time enters through the features of each step only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_TEMPERATURE = 1.0


def token_channels(h: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(batch, tokens, channels) in float32 from a Linear (channels last) or Conv2d (channels at dim 1) output."""
    if channel_dim != -1:
        h = h.movedim(channel_dim, -1)
    return h.reshape(h.shape[0], -1, h.shape[-1]).float()


def divergences(
    h0: torch.Tensor, d_c: torch.Tensor, d_s: torch.Tensor, channel_dim: int = -1, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D_c, D_s), one value per batch sample."""
    h0, d_c, d_s = (token_channels(h, channel_dim) for h in (h0, d_c, d_s))
    scale = temperature * h0.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    log_base = torch.log_softmax(h0 / scale, -1)

    def kl_from_base(delta: torch.Tensor) -> torch.Tensor:
        log_lora = torch.log_softmax((h0 + delta) / scale, -1)
        return (log_lora.exp() * (log_lora - log_base)).sum(-1).mean(-1)

    return kl_from_base(d_c), kl_from_base(d_s)


def balance(ratios: list[float]) -> float:
    """γ: the geometric mean of the finite, positive D_c / D_s of the balance run (1 when there are none)."""
    logs = [math.log(r) for r in ratios if math.isfinite(r) and r > 0]
    return math.exp(sum(logs) / len(logs)) if logs else 1.0


@dataclass(frozen=True)
class FeatureKLRule:
    """The decision given the divergences; `gamma` None means the balance run (both LoRAs, decisions recorded)."""

    gamma: float | None = None
    temperature: float = DEFAULT_TEMPERATURE

    def subject_mask(self, d_c: torch.Tensor, d_s: torch.Tensor) -> torch.Tensor:
        return d_c > self.gamma * d_s
