"""Direct merge, the baseline: every LoRA at weight 1 in every layer at every step."""

from __future__ import annotations

from dataclasses import dataclass

from ..lora import STATIC, STYLE, SUBJECT, LoraSet, Selection
from ..schedule import REFERENCE_STEPS
from .method import Method, RuleOptions, carried


@dataclass(frozen=True)
class DirectRule:
    """A static selection per decided layer: direct's every LoRA there (`of`), or another method's fixed choice
    (blocks, np-lora)."""

    reads_features = False  # decides from weights and time alone

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


def fixed_from_file(scheduled) -> DirectRule:
    """A static file's rule: each decided layer (one adapted by a subject and a style) keeps its one phase."""
    roles, layers = scheduled.roles, scheduled.schedule.layers
    return DirectRule({name: tuple(i for i in layers[name][0][1] if roles[i] != STATIC)
                       for name, carrying in carried(scheduled).items()
                       if {roles[i] for i in carrying} == {SUBJECT, STYLE}})


class DirectMethod(Method):
    name = "direct"
    summary = "Direct merge, the baseline: every LoRA at weight 1 in every layer at every step."

    def build(self, loras: LoraSet, options: RuleOptions, device: str | None = None, progress=iter,
              steps: int = REFERENCE_STEPS) -> tuple[DirectRule, dict]:
        self.settings(options)
        return DirectRule.of(loras), {}

    def rule_from_file(self, scheduled) -> DirectRule:
        return fixed_from_file(scheduled)


METHOD = DirectMethod()
