"""A selection rule run online, the way the published methods run: decided at every forward call.

Forward hooks on the base pipeline's plain modules add the chosen LoRA's output, computed from the low-rank
factors (x -> down -> up, times scale), with the decision taken from the rule's formula at the current progress.
No PEFT, no schedule: this is the independent reference that replay is checked against, and the recorder that
calibration runs on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from merge.lora import BOTH, SOURCES, LoraModule, LoraPair
from merge.replay import Progress


def lora_output(module: torch.nn.Module, x: torch.Tensor, lora: LoraModule) -> torch.Tensor:
    """ΔW x for one LoRA on a Linear or Conv2d, without forming ΔW."""
    down = lora.down.to(device=x.device, dtype=x.dtype)
    up = lora.up.to(device=x.device, dtype=x.dtype)
    if isinstance(module, torch.nn.Conv2d):
        hidden = F.conv2d(x, down, None, module.stride, module.padding, module.dilation, module.groups)
        return F.conv2d(hidden, up) * lora.scale
    return F.linear(F.linear(x, down), up) * lora.scale


class OnlineRule:
    """Install with `with OnlineRule(pipe, pair, rule): pipe(...)`; `decisions` logs (p, module, source)."""

    def __init__(self, pipe, pair: LoraPair, rule, record: bool = False) -> None:
        self.pipe, self.pair, self.rule, self.record = pipe, pair, rule, record
        self.decided = set(pair.both_adapted)
        self.progress = Progress(pipe.scheduler)
        self.p = 0.0
        self.decisions: list[tuple[float, str, str]] = []
        self._handles: list = []

    def _fixed_sources(self, name: str) -> tuple[str, ...]:
        return tuple(s for s in SOURCES if name in self.pair.source(s).modules)

    def _hook(self, name: str):
        fixed = self._fixed_sources(name)

        def add_lora(module, inputs, output):
            if name in self.decided:
                choice = self.rule.choose(name, self.p)
                if self.record:
                    self.decisions.append((self.p, name, choice))
                sources = SOURCES if choice == BOTH else (choice,)
            else:
                sources = fixed
            for source in sources:
                output = output + lora_output(module, inputs[0], self.pair.source(source).modules[name])
            return output

        return add_lora

    def _set_progress(self, module, args, kwargs):
        self.p = self.progress(kwargs["timestep"] if "timestep" in kwargs else args[1])

    def __enter__(self) -> "OnlineRule":
        denoiser = getattr(self.pipe, self.pair.denoiser)
        self._handles.append(denoiser.register_forward_pre_hook(self._set_progress, with_kwargs=True))
        for name in self.pair.module_names:
            component, _, path = name.partition(".")
            module = getattr(self.pipe, component).get_submodule(path)
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
