"""Direct merge, the baseline: both LoRAs at weight 1 in every layer at every step."""

from __future__ import annotations

from dataclasses import dataclass

from ..lora import BOTH


@dataclass(frozen=True)
class DirectRule:
    def choose(self, module: str, p: float) -> str:
        return BOTH

    def phases(self, module: str) -> list[tuple[float, str]]:
        return [(0.0, BOTH)]
