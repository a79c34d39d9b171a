"""A selection rule run online, the way the published methods run: decided at every forward call.

Forward hooks on the base pipeline's plain modules add the chosen LoRA's output, computed from the low-rank
factors (x -> down -> up, times scale), with the decision taken from the rule at the current denoiser call.
No PEFT, no schedule: this is the independent reference that replay is checked against, and the recorder that
calibration runs on.

Rules come in two kinds. Weight-only rules (`choose(module, p)`) decide from the progress p alone, the same for
every sample, among the subjects and styles (static LoRAs ride along in every layer they adapt). Feature rules
(`FeatureKLRule`) decide per sample from the layer's own features; with classifier-free guidance the batch is
[unconditional; conditional] and each prompt's decision is taken on its conditional half and applied to both
halves, so one choice per prompt, layer and step is what gets recorded and replayed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..merge.clock import Clock
from ..merge.lora import BOTH, STATIC, STYLE, SUBJECT, LoraModule, LoraSet
from ..merge.names import get_module
from ..merge.rules.feature_kl import divergences

CODES = {(0,): "c", (1,): "s", (0, 1): "b", (): "n"}  # a pair's selections as the calibration log writes them
DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # several subjects or styles: the winning source's index


def lora_output(module: torch.nn.Module, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """ΔW x for one LoRA on a Linear or Conv2d, from its factors (scale folded into `down`), never forming ΔW."""
    if isinstance(module, torch.nn.Conv2d):
        hidden = F.conv2d(x, down, None, module.stride, module.padding, module.dilation, module.groups)
        return F.conv2d(hidden, up)
    return F.linear(F.linear(x, down), up)


def _factors(lora: LoraModule, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    down = (lora.down.to(torch.float64) * lora.scale).to(weight.device, weight.dtype)
    return down, lora.up.to(weight.device, weight.dtype)


@dataclass
class Call:
    """One denoiser call: its timestep t, progress p, noise level q; per decided layer, per sample choice codes
    (a string over the samples; c, s or b for a pair's subject, style or both) and, for feature rules, the
    divergences (D_c, D_s) per sample."""

    t: float
    p: float
    q: float
    choices: dict[str, str] = field(default_factory=dict)
    scores: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


class OnlineRule:
    """Install with `with OnlineRule(pipe, pair, rule): pipe(...)`; with `record`, `calls` logs every decision.

    `samples` is the number of prompts per pipeline call (to find the conditional half under CFG); None treats
    every row of the batch as its own sample.
    """

    def __init__(self, pipe, pair: LoraSet, rule, record: bool = False, samples: int | None = None) -> None:
        self.pipe, self.pair, self.rule, self.record, self.samples = pipe, pair, rule, record, samples
        self.decided = set(pair.decided if rule.reads_features else rule.layers)
        self.statics = set(pair.indices(STATIC))
        self.clock = Clock.of(pipe)
        self.call: Call | None = None
        self.calls: list[Call] = []
        self._handles: list = []

    def _decide(self, name: str, module, x: torch.Tensor, output: torch.Tensor, factors: dict) -> torch.Tensor:
        """The decided layer's output; records the choice (and scores). A weight-only rule runs only the chosen
        LoRAs' paths; a feature rule needs both to decide."""
        if not self.rule.reads_features:
            riders = tuple(i for i in factors if i in self.statics)
            selection = tuple(sorted(self.rule.choose(name, self.call.p) + riders))
            if self.record and self.pair.is_pair:  # the calibration log's codes; only a pair's choices have one
                self.call.choices[name] = CODES[selection] * (self.samples or output.shape[0])
            for source in selection:
                output = output + lora_output(module, x, *factors[source])  # one source at a time, in PEFT's order
            return output
        rows = output.shape[0]
        half = self.samples if self.samples and rows == 2 * self.samples else 0
        channel_dim = 1 if isinstance(module, torch.nn.Conv2d) else -1
        if not self.pair.is_pair:
            return self._decide_among(name, output, half, channel_dim, {i: lora_output(module, x, *factors[i])
                                                                        for i in factors})
        subject, style = self.pair.selection(BOTH)
        deltas = {SUBJECT: lora_output(module, x, *factors[subject]), STYLE: lora_output(module, x, *factors[style])}
        d_c, d_s = divergences(output[half:], deltas[SUBJECT][half:], deltas[STYLE][half:], channel_dim=channel_dim,
                               temperature=self.rule.temperature)
        if self.rule.gamma is None:
            subject = None
            output = output + deltas[SUBJECT]
            added = deltas[STYLE]
        else:
            subject = self.rule.subject_mask(d_c, d_s)
            rows_mask = subject.repeat(2) if half else subject
            mask = rows_mask.view(-1, *([1] * (output.dim() - 1)))
            added = torch.where(mask, deltas[SUBJECT], deltas[STYLE])
        if self.record:
            codes = "b" * len(d_c) if subject is None else "".join("c" if s else "s" for s in subject.tolist())
            self.call.choices[name] = codes
            self.call.scores[name] = list(zip(d_c.tolist(), d_s.tolist()))
        return output + added

    def _decide_among(self, name: str, output: torch.Tensor, half: int, channel_dim: int,
                      deltas: dict[int, torch.Tensor]) -> torch.Tensor:
        """feature-kl over several subjects or styles: per sample, the LoRA with the largest balanced divergence
        (the balance run adds them all). Codes are source indices as digits; scores one D_k per source."""
        values = divergences(output[half:], *(delta[half:] for delta in deltas.values()), channel_dim=channel_dim,
                             temperature=self.rule.temperature)
        found = dict(zip(deltas, values))
        if not self.rule.calibrated:
            winners = None
            output = output + sum(deltas.values())
        else:
            winners = self.rule.winners(found)
            rows = winners.repeat(2) if half else winners
            for source, delta in deltas.items():
                mask = (rows == source).view(-1, *([1] * (output.dim() - 1)))
                output = output + torch.where(mask, delta, torch.zeros_like(delta))
        if self.record:
            count = len(values[0])
            self.call.choices[name] = "b" * count if winners is None else "".join(DIGITS[i] for i in winners.tolist())
            sources = range(len(self.pair.sources))
            self.call.scores[name] = [[found[k][i].item() if k in found else None for k in sources]
                                      for i in range(count)]
        return output

    def _hook(self, name: str, module):
        fixed = self.pair.adapting(name)
        factors = {i: _factors(self.pair.sources[i].lora.modules[name], module.weight) for i in fixed}
        decided = name in self.decided

        def add_lora(module, inputs, output):
            if decided:
                return self._decide(name, module, inputs[0], output, factors)
            for source in fixed:
                output = output + lora_output(module, inputs[0], *factors[source])
            return output

        return add_lora

    def _start_call(self, module, args, kwargs):
        t = self.clock.timestep(kwargs["timestep"] if "timestep" in kwargs else args[1])
        self.call = Call(t=t, p=self.clock.progress(t), q=self.clock.noise(t))
        if self.record:
            self.calls.append(self.call)

    def __enter__(self) -> "OnlineRule":
        denoiser = getattr(self.pipe, self.pair.denoiser)
        self._handles.append(denoiser.register_forward_pre_hook(self._start_call, with_kwargs=True))
        for name in self.pair.module_names:
            module = get_module(self.pipe, name)
            self._handles.append(module.register_forward_hook(self._hook(name, module)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
