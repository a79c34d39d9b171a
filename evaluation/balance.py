"""`--balance auto`: the setting of a method's balance knob that maximises the harmonic mean of subject and style
fidelity, found on a small grid of probe generations.

Candidates: K-LoRA and EST, the ramp offset β × a scale on the pair's γ; feature-kl, a scale on its γ (a larger
γ favours the style). Each candidate generates the probe images (prompts × seeds, at the merge's steps and size)
with its rule run online (calibration/online.py: for the weight-only rules exactly what replaying its file does,
for feature-kl the rule its calibration then approximates). Each image is scored against the reference images
(evaluation/metrics.py); the candidate whose mean scores have the best harmonic mean of CLIP subject and style
fidelity wins, ties going to the first in grid order.

Every scored image is appended to a JSONL log as soon as it is made (first line: the search's settings and the
pair's own γ), so an interrupted search resumes with the images still missing and a finished one reruns nothing;
a log made with other settings is refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..calibration.online import OnlineRule
from ..calibration.runner import Runner, Settings, append_records, gamma_from_balance_run
from ..merge.errors import LoraschedError
from ..merge.lora import LoraSet
from ..merge.rules.feature_kl import FeatureKLRule
from ..merge.rules.switch import SwitchRule
from .evaluate import render
from .metrics import Fidelity, Judge

LOG_VERSION = 1
OBJECTIVE = "harmonic_clip"  # Fidelity property the search maximises
BETA_OFFSETS = (-0.25, 0.0, 0.25)  # default β grid, around the method's own β
GAMMA_SCALES = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Candidate:
    """One grid point: the ramp offset β (None for a rule without a ramp) and the γ scale."""

    beta: float | None
    gamma_scale: float

    def label(self) -> str:
        beta = "" if self.beta is None else f"β={self.beta:.4g} "
        return f"{beta}γ×{self.gamma_scale:g}"


def grid(beta: float | None, betas: tuple[float, ...] | None = None,
         gamma_scales: tuple[float, ...] | None = None) -> tuple[Candidate, ...]:
    """The candidates in search order (β outer, γ scale inner). `beta` is the method's own β (None: no ramp);
    by default β − 0.25, β, β + 0.25 and γ × 0.5, 1, 2."""
    if beta is None and betas:
        raise LoraschedError("--balance-betas: this method has no ramp offset β to search")
    scales = tuple(gamma_scales or GAMMA_SCALES)
    if not all(math.isfinite(scale) and scale > 0 for scale in scales):
        raise LoraschedError(f"--balance-gamma-scales {','.join(map(str, scales))}: need positive finite numbers")
    if beta is None:
        return tuple(Candidate(None, scale) for scale in scales)
    offsets = tuple(betas) if betas else tuple(round(beta + offset, 6) if offset else beta for offset in BETA_OFFSETS)
    return tuple(Candidate(b, scale) for b in offsets for scale in scales)


@dataclass(frozen=True)
class SearchSettings:
    """What a search depends on; its log is resumed only under the same."""

    method: str
    candidates: tuple[Candidate, ...]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    size: int
    pair: tuple[str, str]  # sha256 of the subject and style files
    references: tuple[str, str]  # sha256 over the subject and the style reference images
    clip: str
    dino: str
    base: str = ""
    rule: dict = field(default_factory=dict)  # the balanced rule's fixed parameters (α, pattern, temperature, …)

    def runs(self) -> list[tuple[int, str, int]]:
        """(candidate index, prompt, seed) in generation order."""
        return [(index, prompt, seed) for index in range(len(self.candidates))
                for prompt in self.prompts for seed in self.seeds]

    def plain(self) -> dict:
        """As stored in the log header (JSON types)."""
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class Search:
    """The finished search: each candidate's mean scores, the winner, and how many images were made now."""

    settings: SearchSettings
    gamma: float  # the pair's own γ, before any scale
    scores: list[Fidelity]  # per candidate, in grid order
    chosen: Candidate
    generated: int
    resumed: int
    log: Path
    references: dict[str, list[str]]

    def record(self) -> dict:
        """What the file's params carry under `balance` (shown by `inspect`)."""
        candidates = self.settings.candidates
        return {
            "objective": OBJECTIVE,
            "grid": {"beta": sorted({c.beta for c in candidates if c.beta is not None}),
                     "gamma_scale": sorted({c.gamma_scale for c in candidates})},
            "candidates": [{**asdict(c), "scores": {k: round(v, 6) for k, v in s.as_dict().items()}}
                           for c, s in zip(candidates, self.scores)],
            "chosen": asdict(self.chosen),
            "prompts": list(self.settings.prompts),
            "seeds": list(self.settings.seeds),
            "steps": self.settings.steps,
            "guidance": self.settings.guidance,
            "size": self.settings.size,
            "clip": self.settings.clip,
            "dino": self.settings.dino,
            "references": self.references,
            "log": self.log.name,
        }


@dataclass(frozen=True)
class Knob:
    """How a method is balanced: its own β (None: no ramp), the fixed rule parameters a log depends on, the
    pair's own γ (computed only for a new log) and the rule a candidate runs with, given that γ."""

    beta: float | None
    fixed: dict
    pair_gamma: Callable[[SearchSettings], float]
    rule: Callable[[Candidate, float], object]


def switch_knob(rule: SwitchRule, params: dict) -> Knob:
    """K-LoRA / EST: the built rule's scores with another β and a scaled γ (nothing is scored again)."""
    return Knob(
        beta=rule.ramp.beta,
        fixed={key: params[key] for key in ("alpha", "pattern", "gamma_mode")},
        pair_gamma=lambda settings: params["gamma"] / params["gamma_scale"],
        rule=lambda candidate, gamma: rule.balanced(candidate.beta, candidate.gamma_scale),  # γ: the rule's own
    )


def feature_kl_knob(pipe, pair: LoraSet, temperature: float) -> Knob:
    """feature-kl: its γ from the balance run calibration makes (first prompt, first seed, both LoRAs), scaled."""

    def pair_gamma(settings: SearchSettings) -> float:
        run = Settings("feature-kl", settings.prompts, settings.seeds, settings.steps, settings.guidance,
                       settings.size, settings.size, settings.pair, settings.base, temperature)
        records = Runner(pipe, pair, run).run(FeatureKLRule(temperature=temperature), [settings.prompts[0]],
                                              settings.seeds[0])
        return gamma_from_balance_run(records, pair)

    return Knob(beta=None, fixed={"temperature": temperature}, pair_gamma=pair_gamma,
                rule=lambda candidate, gamma: FeatureKLRule(gamma=gamma * candidate.gamma_scale,
                                                            temperature=temperature))


def _open_log(path: Path, settings: SearchSettings, pair_gamma: Callable[[SearchSettings], float]):
    """(the pair's γ, {(candidate, prompt, seed): scores} already logged), from the log or a new one."""
    if path.exists() and path.stat().st_size:
        lines = path.read_text().splitlines()
        try:
            header = json.loads(lines[0])
            if header.get("lorasched_balance") != LOG_VERSION:
                raise ValueError
            gamma, logged = float(header["gamma"]), header["settings"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise LoraschedError(f"{path}: not a lorasched balance log") from None
        if logged != settings.plain():
            raise LoraschedError(f"{path}: balance log was made with other settings (grid, probes, references or "
                                 "embedders); remove it to search again")
        done = {}
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by an interruption: that image is made again
                continue
            done[record["candidate"], record["prompt"], record["seed"]] = Fidelity(**record["scores"])
        return gamma, done
    gamma = pair_gamma(settings)
    header = {"lorasched_balance": LOG_VERSION, "settings": settings.plain(), "gamma": gamma}
    path.write_text(json.dumps(header, separators=(",", ":")) + "\n")
    return gamma, {}


def search(pipe, pair: LoraSet, settings: SearchSettings, judge: Judge, log_path, knob: Knob, bar=None) -> Search:
    """Score every candidate of `settings` on the probes with the rule `knob` gives it, run online (see the module
    docstring); `bar` advances once per image."""
    log_path = Path(log_path)
    gamma, done = _open_log(log_path, settings, knob.pair_gamma)
    resumed = sum(1 for run in settings.runs() if run in done)
    if bar is not None:
        bar.update(resumed)
    generated = 0
    for index, candidate in enumerate(settings.candidates):
        todo = [run for run in settings.runs() if run[0] == index and run not in done]
        if not todo:
            continue
        with OnlineRule(pipe, pair, knob.rule(candidate, gamma), samples=1):
            for run in todo:
                _, prompt, seed = run
                image, _ = render(pipe, prompt, seed, settings.steps, settings.guidance, settings.size)
                done[run] = judge.score(image, prompt)
                append_records(log_path, [{"candidate": index, "prompt": prompt, "seed": seed,
                                           "scores": asdict(done[run])}])
                generated += 1
                if bar is not None:
                    bar.update(1)
    scores = [Fidelity.mean([done[run] for run in settings.runs() if run[0] == index])
              for index in range(len(settings.candidates))]
    best = max(range(len(scores)), key=lambda index: getattr(scores[index], OBJECTIVE))  # first of equals
    references = {"subject": judge.subject.names, "style": judge.style.names}
    return Search(settings=settings, gamma=gamma, scores=scores, chosen=settings.candidates[best],
                  generated=generated, resumed=resumed, log=log_path, references=references)

