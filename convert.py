"""The one-shot jobs, the top floor above `merge` and `calibration`: two LoRA files and a base -> one scheduled
LoRA file (`merge`), and a written file checked against its online rule (`verify_file`). The CLI is a thin shell
around them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .calibration import distributed
from .calibration.distributed import Group
from .calibration.probes import DEFAULT_EMBEDDER
from .calibration.verify import VerifyResult, verify, write_report
from .merge import export, fileformat, rules
from .merge.checks import check_paths, check_size, check_steps, pick_device
from .merge.errors import LoraschedError
from .merge.lora_io import read_pair, read_tensors
from .merge.schedule import Schedule, from_rule


@dataclass(frozen=True)
class MergeResult:
    output: Path
    method: str
    schedule: Schedule
    params: dict
    both_adapted: int


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
    group: Group | None = None,
) -> MergeResult | None:
    """Read, score (or calibrate), schedule and export.

    Under a launcher (`accelerate launch -m lorasched merge …`, see calibration/distributed.py) every process
    calls this; feature-kl calibration runs are shared among them and only the main process writes the file and
    returns a result (the others return None). `group` None: the launch this process belongs to.

    Weight-only rules: `steps` is the reference step count `inspect` shows. feature-kl, and EST without β:
    `steps` is the step count of the calibration (or probe) passes, run on the base pipeline with its weights;
    `bar(total)` makes the progress bar of the calibration runs.
    """
    group = group or distributed.current()
    check_steps(steps)
    rules.validate(method, options)
    calibration.check()
    check_paths(subject, style, output)
    needs_runs = method in rules.CALIBRATED or (method == "est" and options.beta is None)
    if not (group.is_main or method in rules.CALIBRATED):
        return None  # under a launcher, only feature-kl calibration is shared; the main process does the rest
    pair = read_pair(base, subject, style, allow_pickle)
    device = group.device or pick_device(device)
    if needs_runs:
        from .calibration.pipeline import default_size, load_pipeline
        from .calibration.prompts import read_prompts, trigger_prompts

        prompts = tuple(read_prompts(calibration.prompts) or trigger_prompts(pair))
        pipe = load_pipeline(base, device)
        size = calibration.size or default_size(pipe)
    if method in rules.CALIBRATED:
        calibrated = _calibrated(pipe, base, pair, options, calibration, prompts, steps, size, output, bar, group)
        if calibrated is None:
            return None
        schedule, params = calibrated
        scores = {}
    else:
        probe = None
        if method == "est" and options.beta is None:
            from .calibration.probes import probe_beta

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
    return MergeResult(Path(output), method, schedule, params, len(pair.both_adapted))


def _calibrated(pipe, base, pair, options, calibration, prompts, steps, size, output, bar,
                group: Group) -> tuple[Schedule, dict] | None:
    """feature-kl: calibration runs (resumed from the log when it has them), then the consensus schedule; None on
    the processes of a launch other than the main one."""
    from .calibration.aggregate import aggregate
    from .calibration.runner import Settings, calibrate
    from .merge.rules.feature_kl import FeatureKLRule

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
    progress_bar = bar(len(settings.runs()) * steps) if bar and group.is_main else None
    try:
        log = calibrate(pipe, pair, FeatureKLRule(temperature=options.temperature), settings, log_path,
                        calibration.batch_size, progress_bar, group)
    finally:
        if progress_bar is not None:
            progress_bar.close()
    if log is None:
        return None
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


def verify_file(path, base: str, prompts, seeds, steps: int | None, guidance: float, size: int | None,
                mode: str, device: str, report_dir: str | None, sources: tuple[str, str] | None = None,
                bar=None, group: Group | None = None) -> VerifyResult | None:
    """`lorasched verify`: check the arguments, load the base with its weights, verify, write the report folder.
    Under a launcher the runs are shared among the processes; the main one gets the result (the others None)."""
    from .calibration.pipeline import default_size, load_pipeline
    from .calibration.prompts import read_prompts

    read_tensors(path)  # one-line errors for a missing, truncated or non-safetensors file
    scheduled = fileformat.read(path)
    steps = steps or int(scheduled.params.get("steps", 30))
    check_steps(steps)
    check_size(size)
    if report_dir is not None and not Path(report_dir).parent.resolve().is_dir():
        raise LoraschedError(f"{report_dir}: folder {Path(report_dir).parent} does not exist")
    prompts = read_prompts(tuple(prompts))
    if not prompts:
        raise LoraschedError(f"{path}: verify needs at least one held-out prompt (--prompts)")
    pair = None
    if sources is not None:
        if None in sources:
            raise LoraschedError(f"{path}: give both --subject and --style, or neither")
        pair = read_pair(base, *sources)
        for lora, role in ((pair.subject, "subject"), (pair.style, "style")):
            if lora.sha256 != scheduled.sources[role]["sha256"]:
                raise LoraschedError(f"{lora.path}: is not the {role} LoRA this file was made from (sha256 differs)")
    group = group or distributed.current()
    pipe = load_pipeline(base, group.device or pick_device(device))
    size = size or default_size(pipe)
    mine = len(group.share(range(len(prompts) * len(seeds))))  # this process's runs, each generated twice
    progress = bar(2 * mine) if bar and group.is_main else None
    try:
        result = verify(pipe, path, prompts, list(seeds), steps, guidance, size, mode, pair, progress, group)
    finally:
        if progress is not None:
            progress.close()
    if report_dir is not None and result is not None:
        write_report(result, scheduled, report_dir)
    return result
