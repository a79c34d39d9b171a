"""How faithful is a scheduled file? The online rule and the replay side by side on held-out prompts and seeds.

For each (prompt, seed): one run with the rule decided online (recording every decision), one with the file
replayed by `attach`, same inputs. Reported: how often the schedule's choice equals the online decision (overall,
per layer, per step), how far the outputs drift apart (final latents, and PSNR of the decoded images), and the
time per image of each. The rule is rebuilt from the file alone (its parameters, scores and factors).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..calibration.aggregate import SOURCE_OF
from ..calibration.online import OnlineRule
from ..calibration.runner import seeded_generators
from ..distributed import Group
from ..merge import fileformat, rules
from ..merge.errors import LoraschedError
from ..merge.lora import STATIC, LoraFile, LoraModule, LoraSet, Source, denoiser_name
from ..merge.replay import attach, source_factors
from ..merge.report import decided_layers
from ..merge.schedule import AXIS_PROGRESS


def loras_from_file(scheduled: fileformat.ScheduledFile, pipe) -> LoraSet:
    """The LoRAs as the file carries them (static weights divided out), ready for the online rule."""
    modules: list[dict[str, LoraModule]] = [{} for _ in scheduled.sources]
    for name, parts in source_factors(scheduled).items():
        for source, (down, up) in parts.items():
            modules[source][name] = LoraModule(down=down, up=up, scale=1.0)
    sources = tuple(
        Source(LoraFile(path=info.file, sha256=info.sha256, dtype=torch.float32, modules=found), info.role)
        for info, found in zip(scheduled.sources, modules)
    )
    return LoraSet(sources=sources, denoiser=denoiser_name(pipe), pipeline_class=type(pipe).__name__)


@dataclass
class Tally:
    """Agreement counts: overall, per layer, per step index."""

    agree: int = 0
    total: int = 0
    layers: dict[str, list[int]] = field(default_factory=dict)
    steps: dict[int, list[int]] = field(default_factory=dict)
    cells: dict[tuple[str, int], list[int]] = field(default_factory=dict)

    def add(self, layer: str, step: int, same: bool) -> None:
        self.agree += same
        self.total += 1
        for table, key in ((self.layers, layer), (self.steps, step), (self.cells, (layer, step))):
            counts = table.setdefault(key, [0, 0])
            counts[0] += same
            counts[1] += 1

    def absorb(self, other: "Tally") -> None:
        """Add another process's counts (a launch's share of the runs)."""
        self.agree += other.agree
        self.total += other.total
        for mine, theirs in ((self.layers, other.layers), (self.steps, other.steps), (self.cells, other.cells)):
            for key, (same, count) in theirs.items():
                counts = mine.setdefault(key, [0, 0])
                counts[0] += same
                counts[1] += count

    @property
    def fraction(self) -> float:
        return self.agree / self.total if self.total else 1.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image batches in [0, 1]; inf when identical."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


class Generation:
    """One pipeline call that keeps both the decoded images and the final latents (from the step callback)."""

    def __init__(self, pipe, steps: int, guidance: float, size: int) -> None:
        self.pipe, self.steps, self.guidance, self.size = pipe, steps, guidance, size

    def __call__(self, prompt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        final = {}

        def keep_latents(pipe, step, timestep, callback_kwargs):
            final["latents"] = callback_kwargs["latents"].detach().clone()
            return callback_kwargs

        start = time.perf_counter()
        images = self.pipe(
            prompt=prompt, num_inference_steps=self.steps, guidance_scale=self.guidance, height=self.size,
            width=self.size, generator=seeded_generators(seed, 1), output_type="pt",
            callback_on_step_end=keep_latents,
        ).images
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize()
        return final["latents"].float().cpu(), images.float().cpu(), time.perf_counter() - start


@dataclass(frozen=True)
class VerifyResult:
    """What `verify` measured: decision agreement (overall, per layer, per step, per cell), how far the replayed
    outputs drift from the online ones, and the time per image of each."""

    file: str
    method: str
    mode: str
    prompts: list[str]
    seeds: list[int]
    steps: int
    layers: list[str]
    agreement: float
    agreement_per_layer: dict[str, float]
    agreement_per_step: list[float]
    agreement_grid: list[list[float]]  # layers × steps
    latent_max_abs_diff: float
    latent_mean_abs_diff: float
    psnr_db_min: float
    psnr_db_mean: float
    seconds_per_image_online: float
    seconds_per_image_replay: float

    def lines(self) -> list[str]:
        """What `lorasched verify` prints: agreement, deviation, timing, and the least agreeing layers."""
        worst = sorted(self.agreement_per_layer.items(), key=lambda item: item[1])[:3]
        speed = self.seconds_per_image_online / self.seconds_per_image_replay
        return [
            f"file        {self.file} ({self.method}, replay mode {self.mode})",
            f"runs        {len(self.prompts)} prompt(s) × seeds {self.seeds}, {self.steps} steps",
            f"agreement   {self.agreement:.2%} of (layer, step) decisions",
            "per step    " + " ".join(f"{share:.0%}" for share in self.agreement_per_step),
            "worst       " + ", ".join(f"{name} {share:.0%}" for name, share in worst),
            f"deviation   latents max |Δ| {self.latent_max_abs_diff:.3g}, mean |Δ| {self.latent_mean_abs_diff:.3g};"
            f" image PSNR min {self.psnr_db_min:.1f} dB, mean {self.psnr_db_mean:.1f} dB",
            f"time        online {self.seconds_per_image_online:.2f} s/image, replay "
            f"{self.seconds_per_image_replay:.2f} s/image ("
            + (f"{speed:.2f}× faster)" if speed >= 1 else f"{1 / speed:.2f}× slower)"),
        ]


def verify(pipe, path, prompts: list[str], seeds: list[int], steps: int, guidance: float, size: int,
           mode: str = "unfused", pair: LoraSet | None = None, bar=None,
           group: Group = Group()) -> VerifyResult | None:
    """Online rule and replay side by side (see module docstring); `bar` is advanced once per generated image.

    `pair`: the source LoRAs, needed for feature rules where the file dropped a LoRA's factors on layers that
    never use it (weight-only rules decide from recorded scores and need only the file). Under a launcher each
    process verifies its share of the runs and the main process gets the result (the others None).
    """
    scheduled = fileformat.read(path, with_tensors=True)
    schedule = scheduled.schedule
    pair = pair or loras_from_file(scheduled, pipe)
    rule = rules.from_file(scheduled)
    layers = decided_layers(scheduled)
    feature_rule = rule.reads_features
    if feature_rule and not set(layers) <= set(pair.decided):
        missing = len(set(layers) - set(pair.decided))
        raise LoraschedError(f"{path}: the file drops an unused LoRA's factors on {missing} layers; the online "
                             "feature-kl rule needs them all: give every source with --subject and --style")
    statics = set(pair.indices(STATIC))
    riders = {layer: tuple(i for i in pair.adapting(layer) if i in statics) for layer in layers}
    generate = Generation(pipe, steps, guidance, size)
    Generation(pipe, 1, guidance, size)(prompts[0], seeds[0])  # warm-up, so the first timed run is not penalised
    runs = group.share([(prompt, seed) for seed in seeds for prompt in prompts])
    tally, online_out, online_time = Tally(), [], []
    for prompt, seed in runs:
        with OnlineRule(pipe, pair, rule, record=True, samples=1) as online:
            latents, images, seconds = generate(prompt, seed)
        online_out.append((latents, images))
        online_time.append(seconds)
        for step, call in enumerate(online.calls):
            at = call.p if schedule.axis == AXIS_PROGRESS else call.q
            for layer in layers:
                decision = SOURCE_OF[call.choices[layer]] if feature_rule else \
                    tuple(sorted(rule.choose(layer, call.p) + riders[layer]))
                tally.add(layer, step, schedule.active(layer, at) == decision)
        if bar is not None:
            bar.update(1)
    handle = attach(pipe, path, mode=mode)
    try:
        measured = []  # per run: latent max |Δ|, mean |Δ|, image PSNR, seconds online, seconds replayed
        for (prompt, seed), (latents_online, images_online), seconds_online in zip(runs, online_out, online_time):
            latents, images, seconds = generate(prompt, seed)
            difference = (latents_online - latents).abs()
            measured.append((float(difference.max()), float(difference.mean()), psnr(images_online, images),
                             seconds_online, seconds))
            if bar is not None:
                bar.update(1)
    finally:
        handle.detach()
    parts = group.gather((tally, measured))
    if not group.is_main:
        return None
    tally = Tally()
    for part, _ in parts:
        tally.absorb(part)
    latent_max, latent_mean, image_psnr, online_time, replay_time = zip(*[m for _, ms in parts for m in ms])
    return VerifyResult(
        file=str(path),
        method=scheduled.method,
        mode=mode,
        prompts=list(prompts),
        seeds=list(seeds),
        steps=steps,
        layers=layers,
        agreement=tally.fraction,
        agreement_per_layer={name: a / n for name, (a, n) in sorted(tally.layers.items())},
        agreement_per_step=[tally.steps[i][0] / tally.steps[i][1] for i in sorted(tally.steps)],
        agreement_grid=[[tally.cells[layer, i][0] / tally.cells[layer, i][1] for i in sorted(tally.steps)]
                        for layer in layers],
        latent_max_abs_diff=max(latent_max),
        latent_mean_abs_diff=math.fsum(latent_mean) / len(latent_mean),
        psnr_db_min=min(image_psnr),
        psnr_db_mean=math.fsum(image_psnr) / len(image_psnr),
        seconds_per_image_online=sum(online_time) / len(online_time),
        seconds_per_image_replay=sum(replay_time) / len(replay_time),
    )


def write_report(result: VerifyResult, scheduled: fileformat.ScheduledFile, folder) -> None:
    """report.json (the numbers, inf PSNR as null), schedule.png and agreement.png (layers × steps)."""
    from ..merge.heatmap import draw_agreement, draw_schedule

    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    numbers = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(result).items()}
    (folder / "report.json").write_text(json.dumps(numbers, indent=1) + "\n")
    draw_schedule(scheduled, result.layers, result.steps, folder / "schedule.png")
    draw_agreement(scheduled, result.agreement_grid, result.layers, result.steps, folder / "agreement.png")
