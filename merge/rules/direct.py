"""Direct merge, the baseline: every LoRA at weight 1 in every layer at every step."""

from __future__ import annotations

from dataclasses import dataclass

from ..lora import LoraSet, Selection


@dataclass(frozen=True)
class DirectRule:
    """A static selection per decided layer: direct's every LoRA there (`of`), or another method's fixed choice
    (blocks, np-lora)."""

    active: dict[str, Selection]

    @classmethod
    def of(cls, loras: LoraSet) -> DirectRule:
        return cls({name: loras.switched(name) for name in loras.decided})

    @property
    def layers(self) -> list[str]:
        return list(self.active)

    def choose(self, module: str, p: float) -> Selection:
        return self.active[module]

    def phases(self, module: str) -> list[tuple[float, Selection]]:
        return [(0.0, self.active[module])]
