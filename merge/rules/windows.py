"""Step windows (as in CRAFT-LoRA, arXiv 2602.18936): subjects active on [0, a) of denoising progress, styles on
[b, 1); where the windows overlap both are, where they leave a gap neither is.

Content early and style late is what the diffusion literature finds (layout and content settle in the noisy first
steps, texture and colour in the last); the default windows a = 0.7, b = 0.3 are CRAFT-LoRA's T_c = [1, 35],
T_s = [15, 50] of 50 steps, rounded.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import parse_floats
from ..lora import STYLE, SUBJECT, LoraSet, Selection
from ..schedule import REFERENCE_STEPS
from .method import Method, Option, ParamsCheck, RuleOptions, carried

DEFAULT_WINDOWS = (0.7, 0.3)


@dataclass(frozen=True)
class WindowsRule:
    reads_features = False  # decides from weights and time alone

    subject_end: float
    style_start: float
    roles: tuple[str, ...]
    adapting: dict[str, Selection]  # per layer, the subjects and styles that adapt it

    @classmethod
    def of(cls, loras: LoraSet, subject_end: float, style_start: float) -> WindowsRule:
        roles = tuple(source.role for source in loras.sources)
        return cls(subject_end, style_start, roles, {name: loras.switched(name) for name in loras.denoiser_modules})

    @property
    def layers(self) -> list[str]:
        return list(self.adapting)

    def choose(self, module: str, p: float) -> Selection:
        on = {SUBJECT: p < self.subject_end, STYLE: p >= self.style_start}
        return tuple(i for i in self.adapting[module] if on[self.roles[i]])

    def phases(self, module: str) -> list[tuple[float, Selection]]:
        phases: list[tuple[float, Selection]] = []
        for start in sorted({0.0, self.subject_end, self.style_start} - {1.0}):
            if 0.0 <= start < 1.0:
                selection = self.choose(module, start)
                if not phases or phases[-1][1] != selection:
                    phases.append((start, selection))
        return phases


def _windows_problem(windows) -> str | None:
    if len(windows) == 2 and all(0 <= w <= 1 for w in windows):
        return None
    return "give a,b with both in [0, 1]"


class WindowsMethod(Method):
    name = "windows"
    summary = "Step windows (CRAFT-LoRA): subjects on [0, a) of denoising progress, styles on [b, 1)."
    options = (Option("windows", str, "windows: `a,b`: subjects active on [0, a), styles on [b, 1) of denoising "
                      f"progress (default {','.join(map(str, DEFAULT_WINDOWS))}).", default=DEFAULT_WINDOWS,
                      problem=_windows_problem, parse=parse_floats),)
    numbers = ("subject_end", "style_start")

    def build(self, loras: LoraSet, options: RuleOptions, device: str | None = None, progress=iter,
              steps: int = REFERENCE_STEPS) -> tuple[WindowsRule, dict]:
        subject_end, style_start = self.settings(options).windows
        return WindowsRule.of(loras, subject_end, style_start), {"subject_end": subject_end,
                                                                  "style_start": style_start}

    def check_params(self, params: dict, roles: tuple[str, ...], check: ParamsCheck) -> None:
        if not all(0 <= params[key] <= 1 for key in ("subject_end", "style_start")):
            check.fail("has windows outside [0, 1]")

    def rule_from_file(self, scheduled) -> WindowsRule:
        params = scheduled.params
        return WindowsRule(params["subject_end"], params["style_start"], scheduled.roles, carried(scheduled))


METHOD = WindowsMethod()
