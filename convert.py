"""The one-shot jobs, the top floor above `merge` and `calibration`: LoRA files and a base -> one scheduled
LoRA file (`merge`), and a written file checked against its online rule (`verify_file`). The CLI is a thin shell
around them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed
from .calibration.embedders import DEFAULT_CLIP, DEFAULT_DINO, DEFAULT_EMBEDDER
from .calibration.online import DIGITS
from .distributed import Group
from .evaluation.evaluate import EvalResult
from .evaluation.verify import VerifyResult, verify, write_report
from .merge import export, fileformat, rules
from .merge.checks import LoraSpec, check_report_dir, check_size, check_sources, check_steps, pick_device
from .merge.errors import LoraschedError
from .merge.lora import ROLES, STATIC, STYLE, SUBJECT
from .merge.lora_io import read_set, read_tensors
from .merge.rank import RankRequest, reduce
from .merge.rules import Method, RuleOptions
from .merge.schedule import REFERENCE_STEPS, Schedule, from_rule


@dataclass(frozen=True)
class MergeResult:
    output: Path
    method: str
    schedule: Schedule
    params: dict
    decided: int
    search: object | None = None  # evaluation.balance.Search of `--balance auto`


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


@dataclass(frozen=True)
class Balance:
    """`--balance auto`: the reference images the search scores against, its grid (None: the method's default,
    see evaluation/balance.py) and the embedders that score."""

    subject_images: str | None
    style_images: str | None
    betas: tuple[float, ...] | None = None
    gamma_scales: tuple[float, ...] | None = None
    clip: str = DEFAULT_CLIP
    dino: str = DEFAULT_DINO

    def check(self, method: Method, options: RuleOptions, group: Group) -> None:
        from .evaluation.balance import grid

        if not method.balance_knob:
            knobs = ", ".join(name for name in rules.names() if rules.get(name).balance_knob)
            raise LoraschedError(f"--balance auto: {method.name} has no balance knob (use {knobs})")
        if not (self.subject_images and self.style_images):
            raise LoraschedError("--balance auto: give --subject-images and --style-images (what the search scores "
                                 "against)")
        if "gamma_scale" in options:
            raise LoraschedError("--balance auto sets the γ scale itself; give --balance-gamma-scales for its grid "
                                 "instead of --gamma-scale")
        if group.size > 1:
            raise LoraschedError("--balance auto: runs in one process; start it without a launcher")
        grid(None if method.calibrated else 0.0, self.betas, self.gamma_scales)


@dataclass(frozen=True)
class MergeRequest:
    """One merge, as the CLI, each `merge-many` row and a Python caller describe it: the Python way to merge is
    `merge_loras(MergeRequest(base, loras, output, "klora", RuleOptions(pattern="s*")))`.

    `loras`: the inputs with their roles and strengths (`LoraSpec`); `method`: a registered method's name
    (`rules.names()`), `options` its options (anything it does not take is refused). Weight-only methods: `steps`
    is the reference step count `inspect` shows; feature-kl, and EST without β: the step count of the calibration
    (or probe) passes. `balance`: first search the method's balance knob (evaluation/balance.py). `rank`: each
    source's delta per layer re-factorised to that rank first (merge/rank.py), refused where a layer would lose
    more than `max_error` of it."""

    base: str
    loras: tuple[LoraSpec, ...]
    output: str
    method: str = "klora"
    options: RuleOptions = field(default_factory=RuleOptions)
    steps: int = REFERENCE_STEPS
    device: str = "auto"
    dtype: torch.dtype | None = None
    tensor_format: str | None = None
    allow_pickle: bool = False
    calibration: Calibration = Calibration()
    balance: Balance | None = None
    rank: RankRequest | None = None
    max_error: float | None = None


def merge(base: str, subject: str, style: str, output: str, method: str = "klora",
          options: RuleOptions = RuleOptions(), **fields) -> MergeResult | None:
    """`merge_loras` of one subject and one style LoRA; `fields`: the other `MergeRequest` fields."""
    loras = (LoraSpec(subject, SUBJECT), LoraSpec(style, STYLE))
    return merge_loras(MergeRequest(base, loras, output, method, options, **fields))


def merge_loras(request: MergeRequest, *, progress=iter, bar=None, group: Group | None = None,
                search_bar=None) -> MergeResult | None:
    """Read, score (or calibrate), schedule and export the request's LoRAs.

    Under a launcher (`accelerate launch -m lorasched merge …`, see distributed.py) every process
    calls this; calibration runs are shared among them and only the main process writes the file and returns a
    result (the others return None). `group` None: the launch this process belongs to. `progress` wraps the
    per-module scoring loop, `bar(total)` makes the progress bar of the calibration runs, `search_bar(total)`
    that of `--balance auto` (per image).
    """
    group = group or distributed.current()
    method, options, steps, output = rules.get(request.method), request.options, request.steps, request.output
    loras = sorted(request.loras, key=lambda spec: ROLES.index(spec.role))  # subjects, styles, static: as given
    check_steps(steps)
    method.settings(options)
    request.calibration.check()
    check_sources(loras, output)
    balance, probe_needed = request.balance, method.needs_probe(options)
    pair_only = {"--balance auto": balance is not None,
                 f"--method {method.name} without --beta (its probe images)": probe_needed}
    for what, needs_pair in pair_only.items():
        if needs_pair and [spec.role for spec in loras] != [SUBJECT, STYLE]:
            raise LoraschedError(f"{what}: works on one --subject and one --style; for more LoRAs give --beta or "
                                 "use another method")
    if method.calibrated and len(loras) > len(DIGITS):
        raise LoraschedError(f"--method {method.name}: selects among at most {len(DIGITS)} LoRAs")
    if not method.takes_static and any(spec.role == STATIC for spec in loras):
        raise LoraschedError(f"--method {method.name}: selects among subjects and styles; a static LoRA (--lora) "
                             "would change the features it measures, so give it as --subject or --style")
    if balance is not None:
        balance.check(method, options, group)
    needs_runs = method.calibrated or probe_needed or balance is not None
    if not (group.is_main or method.calibrated):
        return None  # under a launcher, only calibration runs are shared; the main process does the rest
    if request.max_error is not None and not (request.rank is not None and 0 <= request.max_error <= 1):
        raise LoraschedError(f"--max-error {request.max_error}: give a fraction in [0, 1], with --rank")
    calibration = request.calibration
    loraset = read_set(request.base, loras, request.allow_pickle)
    loraset, reduced = reduce(loraset, request.rank, request.max_error)
    device = group.device or pick_device(request.device)
    if needs_runs:
        from .calibration.pipeline import default_size, load_pipeline
        from .calibration.prompts import read_prompts, trigger_prompts

        prompts = tuple(read_prompts(calibration.prompts) or trigger_prompts(loraset))
        pipe = load_pipeline(request.base, device)
        size = calibration.size or default_size(pipe)
    search = None
    if method.calibrated:
        if balance is not None:
            from .evaluation.balance import feature_kl_knob

            knob = feature_kl_knob(pipe, loraset, method.settings(options).temperature)
            search = _search_balance(pipe, loraset, method, request.base, balance, knob, prompts, calibration, steps,
                                     size, output, device, search_bar)
            options = options.replace(gamma_scale=search.chosen.gamma_scale)
        calibrated = _calibrated(pipe, request.base, loraset, method, options, calibration, prompts, steps, size,
                                 output, bar, group)
        if calibrated is None:
            return None
        schedule, params = calibrated
        if search is not None:
            params["balance"] = search.record()
        scores, decided = {}, len(loraset.decided)
    else:
        probe = None
        if probe_needed:
            from .calibration.probes import probe_beta

            probe = probe_beta(pipe, loraset, prompts[0], calibration.embedder, steps, calibration.guidance, size)
            options = options.replace(beta=probe["beta"])
        loraset = method.prepare(loraset, options)
        rule, params = method.build(loraset, options, device, progress, steps)
        if balance is not None:
            from .evaluation.balance import switch_knob

            search = _search_balance(pipe, loraset, method, request.base, balance, switch_knob(rule, params),
                                     prompts, calibration, steps, size, output, device, search_bar)
            rule, params = method.rebalance(rule, params, search.chosen.beta, search.chosen.gamma_scale)
            params["balance"] = search.record()
        if probe is not None:
            params["beta_source"] = probe
        params["steps"] = steps
        schedule = from_rule(rule, loraset)
        if not any(loraset.is_denoiser(name) for name in schedule.layers):
            raise LoraschedError(f"{output}: --method {method.name} leaves every denoiser layer without a LoRA for "
                                 "the whole run; nothing to write")
        scores, decided = getattr(rule, "scores", {}), len(rule.layers)
    if reduced.changed:
        params["rank"] = reduced.record()
    export.export(output, loraset, schedule, method=method.name, params=params, scores=scores, dtype=request.dtype,
                  tensor_format=request.tensor_format)
    return MergeResult(Path(output), method.name, schedule, params, decided, search)


def _calibrated(pipe, base, loras, method: Method, options: RuleOptions, calibration, prompts, steps, size,
                output, bar, group: Group) -> tuple[Schedule, dict] | None:
    """A calibrated method: calibration runs (resumed from the log when it has them), then the consensus schedule;
    None on the processes of a launch other than the main one."""
    from .calibration.aggregate import aggregate
    from .calibration.runner import Settings, calibrate

    settings = method.settings(options)
    runs = Settings(
        method=method.name,
        prompts=prompts,
        seeds=calibration.seeds,
        steps=steps,
        guidance=calibration.guidance,
        height=size,
        width=size,
        pair=tuple(source.lora.sha256 for source in loras.sources),
        base=_base_id(base),
        temperature=settings.temperature,
        gamma_scale=settings.gamma_scale,
    )
    log_path = Path(calibration.log or f"{output}.calibration.jsonl")
    progress_bar = bar(len(runs.runs()) * steps) if bar and group.is_main else None
    try:
        log = calibrate(pipe, loras, method.balance_run_rule(options), runs, log_path, calibration.batch_size,
                        progress_bar, group)
    finally:
        if progress_bar is not None:
            progress_bar.close()
    if log is None:
        return None
    schedule = aggregate(log, loras, calibration.min_run)
    shares = [share for values in schedule.agreement.values() for share in values]
    _, params = method.calibrated_rule(log.gamma, options, tuple(s.role for s in loras.sources))
    params.update(steps=steps, calibration={
        "prompts": list(prompts),
        "seeds": list(calibration.seeds),
        "guidance": calibration.guidance,
        "size": size,
        "runs": len(log.runs),
        "min_run": calibration.min_run,
        "log": log_path.name,
        "mean_agreement": sum(shares) / len(shares),
    })
    return schedule, params


def _base_id(base: str) -> str:
    """The base as logs record it: a resolved folder, or the hub id."""
    return str(Path(base).resolve()) if Path(base).exists() else base


def _search_balance(pipe, pair, method, base, balance: Balance, knob, prompts, calibration: Calibration, steps,
                    size, output, device, bar):
    """`--balance auto`: the search over the method's balance `knob`, on the calibration's prompts, seeds,
    guidance and size, logged next to the output (an interrupted search resumes)."""
    from .evaluation.balance import SearchSettings, grid, search
    from .evaluation.metrics import load_judge

    judge = load_judge(balance.clip, balance.dino, balance.subject_images, balance.style_images, device)
    settings = SearchSettings(
        method=method.name, candidates=grid(knob.beta, balance.betas, balance.gamma_scales), prompts=tuple(prompts),
        seeds=calibration.seeds, steps=steps, guidance=calibration.guidance, size=size,
        pair=(pair.subject.sha256, pair.style.sha256), references=(judge.subject.sha256, judge.style.sha256),
        clip=balance.clip, dino=balance.dino, base=_base_id(base), rule=knob.fixed,
    )
    progress = bar(len(settings.runs())) if bar else None
    try:
        return search(pipe, pair, settings, judge, Path(f"{output}.balance.jsonl"), knob, progress)
    finally:
        if progress is not None:
            progress.close()


def evaluate_files(paths, base: str, subject_images: str, style_images: str, prompts, seeds, steps: int,
                   guidance: float, size: int | None, clip: str = DEFAULT_CLIP, dino: str = DEFAULT_DINO,
                   mode: str = "fused", device: str = "auto", report_dir: str | None = None, bar=None) -> EvalResult:
    """`lorasched eval`: check the files and arguments, read the references, load the embedders and the base
    with its weights, generate with each file and score; write the report folder when asked."""
    from .calibration.pipeline import default_size, load_pipeline
    from .calibration.prompts import read_prompts
    from .evaluation.evaluate import evaluate, write_report
    from .evaluation.metrics import load_judge

    for path in paths:
        read_tensors(path)  # one-line errors for a missing, truncated or non-safetensors file
        fileformat.read(path)
    check_steps(steps)
    check_size(size)
    check_report_dir(report_dir)
    prompts = read_prompts(tuple(prompts))
    if not prompts:
        raise LoraschedError("eval needs at least one prompt (--prompts)")
    device = pick_device(device)
    judge = load_judge(clip, dino, subject_images, style_images, device)
    pipe = load_pipeline(base, device)
    size = size or default_size(pipe)
    progress = bar(len(paths) * len(prompts) * len(seeds)) if bar else None
    try:
        result = evaluate(pipe, list(paths), judge, prompts, list(seeds), steps, guidance, size, mode, progress)
    finally:
        if progress is not None:
            progress.close()
    if report_dir is not None:
        write_report(result, report_dir)
    return result


def verify_file(path, base: str, prompts, seeds, steps: int | None, guidance: float, size: int | None,
                mode: str, device: str, report_dir: str | None, sources: list[tuple[str, str]] | None = None,
                bar=None, group: Group | None = None) -> VerifyResult | None:
    """`lorasched verify`: check the arguments, load the base with its weights, verify, write the report folder.
    `sources`: (path, role) of the LoRAs the file was made from, in its order (feature-kl files need them).
    Under a launcher the runs are shared among the processes; the main one gets the result (the others None)."""
    from .calibration.pipeline import default_size, load_pipeline
    from .calibration.prompts import read_prompts

    read_tensors(path)  # one-line errors for a missing, truncated or non-safetensors file
    scheduled = fileformat.read(path)
    steps = steps or int(scheduled.params.get("steps", REFERENCE_STEPS))
    check_steps(steps)
    check_size(size)
    check_report_dir(report_dir)
    prompts = read_prompts(tuple(prompts))
    if not prompts:
        raise LoraschedError(f"{path}: verify needs at least one held-out prompt (--prompts)")
    loras = None
    if sources:
        specs = [LoraSpec(path, role) for path, role in sources]
        given = ", ".join(f"{spec.role} {spec.path}" for spec in specs)
        made = ", ".join(f"{s.role} {s.file}" for s in scheduled.sources)
        if [spec.role for spec in specs] != list(scheduled.roles):
            raise LoraschedError(f"{path}: was made from {made}; give those with --subject and --style, not {given}")
        loras = read_set(base, specs)
        if [s.lora.sha256 for s in loras.sources] != [s.sha256 for s in scheduled.sources]:
            raise LoraschedError(f"{path}: was made from {made}, not from {given} (sha256 differs)")
    group = group or distributed.current()
    pipe = load_pipeline(base, group.device or pick_device(device))
    size = size or default_size(pipe)
    mine = len(group.share(range(len(prompts) * len(seeds))))  # this process's runs, each generated twice
    progress = bar(2 * mine) if bar and group.is_main else None
    try:
        result = verify(pipe, path, prompts, list(seeds), steps, guidance, size, mode, loras, progress, group)
    finally:
        if progress is not None:
            progress.close()
    if report_dir is not None and result is not None:
        write_report(result, scheduled, report_dir)
    return result
