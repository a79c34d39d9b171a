"""The one-shot job: two LoRA files and a base -> one scheduled LoRA file. The CLI is a thin shell around it."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from calibration.probes import DEFAULT_EMBEDDER

from . import export, rules
from .base import load_skeleton
from .errors import LoraschedError
from .lora import STYLE, SUBJECT, LoraPair, denoiser_name
from .lora_io import open_lora, read_lora
from .schedule import Schedule, from_rule


@dataclass(frozen=True)
class MergeResult:
    output: Path
    schedule: Schedule
    params: dict
    both_adapted: int


def check_paths(subject: str, style: str, output: str) -> None:
    out = Path(output)
    for given in (subject, style):
        if Path(given).exists() and out.exists() and os.path.samefile(given, out):
            raise LoraschedError(f"{output}: output path is one of the inputs")
        if Path(given).resolve() == out.resolve():
            raise LoraschedError(f"{output}: output path is one of the inputs")
    if not out.parent.resolve().is_dir():
        raise LoraschedError(f"{output}: folder {out.parent} does not exist")
    if out.suffix != ".safetensors":
        raise LoraschedError(f"{output}: output must be a .safetensors file")


def read_pair(base: str, subject: str, style: str, allow_pickle: bool = False) -> LoraPair:
    """Both LoRAs checked, then read onto one skeleton of the base in their own (promoted) dtype; see base.py."""
    raw_subject, raw_style = open_lora(subject, allow_pickle), open_lora(style, allow_pickle)
    skeleton = load_skeleton(base, torch.promote_types(raw_subject.dtype, raw_style.dtype))
    pair = LoraPair(
        subject=read_lora(raw_subject, skeleton, SUBJECT),
        style=read_lora(raw_style, skeleton, STYLE),
        denoiser=denoiser_name(skeleton),
        pipeline_class=type(skeleton).__name__,
        single_text_encoder=getattr(skeleton, "text_encoder_2", None) is None,
    )
    if not pair.both_adapted:
        raise LoraschedError(f"{style}: adapts no denoiser module that {subject} adapts; nothing to schedule")
    return pair


def pick_device(device: str = "auto") -> str:
    """`cuda` when asked for or, with `auto`, when present; else `cpu`."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LoraschedError("--device cuda: no CUDA device is available")
    return device


@dataclass(frozen=True)
class Calibration:
    """How to run the denoising passes that feature-kl (and EST's probe β) need; ignored by weight-only rules."""

    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    guidance: float = 7.5
    size: int | None = None
    batch_size: int = 4
    log: str | None = None
    min_run: int = 1
    embedder: str = DEFAULT_EMBEDDER

    def check(self) -> None:
        if not self.seeds:
            raise LoraschedError("--seeds: need at least one seed")
        if self.batch_size < 1:
            raise LoraschedError(f"--batch-size {self.batch_size}: need at least 1")
        if self.min_run < 1:
            raise LoraschedError(f"--min-run {self.min_run}: need at least 1 bin")
        check_size(self.size)


def check_steps(steps: int) -> None:
    if steps < 1:
        raise LoraschedError(f"--steps {steps}: need at least one denoising step")


def check_size(size: int | None) -> None:
    """A requested image size the VAE can take (None: the pipeline's own)."""
    if size is not None and (size < 8 or size % 8):
        raise LoraschedError(f"--resolution {size}: must be a positive multiple of 8")


def parse_seeds(text: str) -> tuple[int, ...]:
    """`0,1,2,3` -> (0, 1, 2, 3)."""
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise LoraschedError(f"--seeds {text!r}: give integers separated by commas, e.g. 0,1,2,3") from None
    if not seeds or min(seeds) < 0:
        raise LoraschedError(f"--seeds {text!r}: give one or more non-negative integers, e.g. 0,1,2,3")
    return seeds


def merge(
    base: str,
    subject: str,
    style: str,
    output: str,
    method: str = "klora",
    options: rules.RuleOptions = rules.RuleOptions(),
    *,
    steps: int = 30,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    tensor_format: str | None = None,
    allow_pickle: bool = False,
    calibration: Calibration = Calibration(),
    progress=iter,
    bar=None,
) -> MergeResult:
    """Read, score (or calibrate), schedule and export.

    Weight-only rules: `steps` is the reference step count `inspect` shows. feature-kl, and EST without β:
    `steps` is the step count of the calibration (or probe) passes, run on the base pipeline with its weights;
    `bar(total)` makes the progress bar of the calibration runs.
    """
    check_steps(steps)
    rules.validate(method, options)
    calibration.check()
    check_paths(subject, style, output)
    pair = read_pair(base, subject, style, allow_pickle)
    device = pick_device(device)
    needs_runs = method in rules.CALIBRATED or (method == "est" and options.beta is None)
    if needs_runs:
        from calibration.pipeline import default_size, load_pipeline
        from calibration.prompts import read_prompts, trigger_prompts

        prompts = tuple(read_prompts(calibration.prompts) or trigger_prompts(pair))
        pipe = load_pipeline(base, device)
        size = calibration.size or default_size(pipe)
    if method in rules.CALIBRATED:
        schedule, params = _calibrated(pipe, base, pair, options, calibration, prompts, steps, size, output, bar)
        scores = {}
    else:
        probe = None
        if method == "est" and options.beta is None:
            from calibration.probes import probe_beta

            probe = probe_beta(pipe, pair, prompts[0], calibration.embedder, steps, calibration.guidance, size)
            options = replace(options, beta=probe["beta"])
        rule, params = rules.build(method, pair, options, device, progress)
        if probe is not None:
            params["beta_source"] = probe
        params["steps"] = steps
        schedule = from_rule(rule, pair)
        scores = getattr(rule, "scores", {})
    export.export(output, pair, schedule, method=method, params=params, scores=scores, dtype=dtype,
                  tensor_format=tensor_format)
    return MergeResult(Path(output), schedule, params, len(pair.both_adapted))


def _calibrated(pipe, base, pair, options, calibration, prompts, steps, size, output, bar) -> tuple[Schedule, dict]:
    """feature-kl: calibration runs (resumed from the log when it has them), then the consensus schedule."""
    from calibration.aggregate import aggregate
    from calibration.runner import Settings, calibrate
    from merge.rules.feature_kl import FeatureKLRule

    settings = Settings(
        method="feature-kl",
        prompts=prompts,
        seeds=calibration.seeds,
        steps=steps,
        guidance=calibration.guidance,
        height=size,
        width=size,
        pair=(pair.subject.sha256, pair.style.sha256),
        base=str(Path(base).resolve()) if Path(base).exists() else base,
        temperature=options.temperature,
    )
    log_path = Path(calibration.log or f"{output}.calibration.jsonl")
    progress_bar = bar(len(settings.runs()) * steps) if bar else None
    try:
        log = calibrate(pipe, pair, FeatureKLRule(temperature=options.temperature), settings, log_path,
                        calibration.batch_size, progress_bar)
    finally:
        if progress_bar is not None:
            progress_bar.close()
    schedule = aggregate(log, pair, calibration.min_run)
    shares = [share for values in schedule.agreement.values() for share in values]
    params = {
        "gamma": log.gamma,
        "temperature": options.temperature,
        "steps": steps,
        "calibration": {
            "prompts": list(prompts),
            "seeds": list(calibration.seeds),
            "guidance": calibration.guidance,
            "size": size,
            "runs": len(log.runs),
            "min_run": calibration.min_run,
            "log": log_path.name,
            "mean_agreement": sum(shares) / len(shares),
        },
    }
    return schedule, params
