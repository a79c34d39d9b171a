"""Calibration runs: the pipeline with the online rule installed, over prompts × seeds, logged to a JSONL file.

The log's first line is a header (settings, the decided layers in a fixed order, and for feature rules the γ of
the balance run); every later line is one finished run (prompt, seed) with, per denoiser call, its time
coordinates and one choice code per layer ("c" subject, "s" style, "b" both) plus the scores behind it. Lines are
appended and flushed per batch, so an interrupted calibration resumes from the runs already logged, and a later
merge can re-aggregate without running anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..distributed import Group
from ..merge.errors import LoraschedError
from ..merge.lora import LoraSet
from ..merge.rules.feature_kl import balance
from .online import OnlineRule

LOG_VERSION = 1


@dataclass(frozen=True)
class Settings:
    """What a calibration run depends on; a log is only resumed or reused under the same settings."""

    method: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    height: int
    width: int
    pair: tuple[str, ...]  # sha256 of the source files, in order (a pair: subject, style)
    base: str = ""  # the base pipeline (resolved folder or hub id)
    temperature: float = 1.0  # feature-kl's softmax temperature
    gamma_scale: float = 1.0  # feature-kl: the rule decides with the balance run's γ times this

    def runs(self) -> list[tuple[str, int]]:
        return [(prompt, seed) for seed in self.seeds for prompt in self.prompts]


@dataclass
class Log:
    """A calibration log in memory: the header and the finished runs."""

    settings: Settings
    layers: list[str]
    gamma: float | list[float | None] | None  # a pair's γ, or each source's balance (see gamma_from_balance_run)
    runs: list[dict]

    def done(self) -> set[tuple[str, int]]:
        return {(run["prompt"], run["seed"]) for run in self.runs}


def _header(log: Log) -> dict:
    settings = asdict(log.settings)
    return {"lorasched_calibration": LOG_VERSION, "settings": settings, "layers": log.layers, "gamma": log.gamma}


def read_log(path: Path) -> Log:
    """A log file; a torn last line (the process was killed mid-write) is dropped."""
    lines = Path(path).read_text().splitlines()
    try:
        header = json.loads(lines[0])
        if header.get("lorasched_calibration") != LOG_VERSION:
            raise ValueError
        raw = header["settings"]
        settings = Settings(**{**raw, "prompts": tuple(raw["prompts"]), "seeds": tuple(raw["seeds"]),
                               "pair": tuple(raw["pair"])})
    except (IndexError, ValueError, KeyError, TypeError):
        raise LoraschedError(f"{path}: not a lorasched calibration log") from None
    runs = []
    for line in lines[1:]:
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return Log(settings=settings, layers=header["layers"], gamma=header["gamma"], runs=runs)


def seeded_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per sample: each prompt of a batch gets the latents it would get alone, on any device."""
    return [torch.Generator("cpu").manual_seed(seed) for _ in range(count)]


class Runner:
    """Runs the pipeline with a rule installed and turns what the rule recorded into log lines."""

    def __init__(self, pipe, pair: LoraSet, settings: Settings, bar=None) -> None:
        self.pipe, self.pair, self.settings, self.bar = pipe, pair, settings, bar

    def _step_callback(self, count: int):
        def on_step_end(pipe, step, timestep, callback_kwargs):
            if self.bar is not None:
                self.bar.update(count)
            return callback_kwargs

        return on_step_end

    def run(self, rule, prompts: list[str], seed: int) -> list[dict]:
        """One pipeline call for a batch of prompts at one seed; one log record per prompt."""
        with OnlineRule(self.pipe, self.pair, rule, record=True, samples=len(prompts)) as online:
            self.pipe(
                prompt=prompts,
                num_inference_steps=self.settings.steps,
                guidance_scale=self.settings.guidance,
                height=self.settings.height,
                width=self.settings.width,
                generator=seeded_generators(seed, len(prompts)),
                output_type="latent",
                callback_on_step_end=self._step_callback(len(prompts)),
            )
        layers = self.pair.decided
        records = []
        for i, prompt in enumerate(prompts):
            calls = []
            for call in online.calls:
                entry = {"t": call.t, "p": call.p, "q": call.q, "choices": "".join(call.choices[n][i] for n in layers)}
                if call.scores:
                    entry["scores"] = [list(call.scores[n][i]) for n in layers]
                calls.append(entry)
            records.append({"prompt": prompt, "seed": seed, "calls": calls})
        return records


def append_records(path: Path, records: list[dict]) -> None:
    """Append JSON lines and make them durable before going on: an interruption loses at most the line being
    written, which `read_log` drops."""
    with open(path, "a") as handle:
        handle.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())


def gamma_from_balance_run(records: list[dict], pair: LoraSet) -> float | list[float | None]:
    """Feature rules: from the divergences of the balance run (every LoRA applied, every layer and step), a pair's
    γ, or with several subjects or styles each LoRA's own balance b_k (None for a LoRA no layer decides on)."""
    scores = [score for record in records for call in record["calls"] for score in call["scores"]]
    if pair.is_pair:
        return balance([c / s if s > 0 else float("inf") for c, s in scores])
    return [balance([score[k] for score in scores if score[k] is not None])
            if any(score[k] is not None for score in scores) else None for k in range(len(pair.sources))]


def shard_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.name}.shard{rank}")


def _shards(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.shard*"))


def _batches(settings: Settings, done: set[tuple[str, int]], batch_size: int) -> list[tuple[list[str], int]]:
    """The runs still to do, batched as a single process batches them: per seed, up to `batch_size` prompts."""
    batches = []
    for seed in settings.seeds:
        todo = [prompt for prompt in settings.prompts if (prompt, seed) not in done]
        batches += [(todo[start : start + batch_size], seed) for start in range(0, len(todo), batch_size)]
    return batches


def _open_log(pipe, pair: LoraSet, rule, settings: Settings, path: Path) -> Log:
    """The log at `path` (checked against `settings`), or a new one with its header (and γ from the balance run)."""
    if path.exists() and path.stat().st_size:
        log = read_log(path)
        if log.settings != settings:
            raise LoraschedError(f"{path}: calibration log was made with other settings; give a new --log path")
        return log
    gamma = None
    if rule.reads_features and not rule.calibrated:
        gamma = gamma_from_balance_run(Runner(pipe, pair, settings).run(rule, [settings.prompts[0]], settings.seeds[0]),
                                       pair)
    log = Log(settings=settings, layers=pair.decided, gamma=gamma, runs=[])
    path.write_text(json.dumps(_header(log), separators=(",", ":")) + "\n")
    return log


def calibrate(pipe, pair: LoraSet, rule, settings: Settings, path: Path, batch_size: int = 4, bar=None,
              group: Group = Group()) -> Log | None:
    """Run every (prompt, seed) not yet logged at `path` and log it; returns the complete log (None on the
    processes of a launch other than the main one).

    A feature rule without γ first runs its balance run (first prompt, first seed, both LoRAs) to fix γ.
    `bar` (tqdm-like, total = runs × steps) is advanced once per prompt and step.

    Under a launcher (`group.size > 1`) the main process opens the log; then each process takes every size-th
    batch of the runs still to do (batched exactly as one process would, so each run computes the same numbers)
    and appends it to its own shard `<log>.shard<rank>`. The main process then folds every shard into the log in
    the order one process would have written it, and removes the shards. A process that dies leaves its finished
    runs in its shard: the next launch, of any size, counts them as done.
    """
    path = Path(path)
    log = _together(group, lambda: _open_log(pipe, pair, rule, settings, path) if group.is_main else None)
    log = log or read_log(path)
    if rule.reads_features:
        rule = rule.with_balance(log.gamma, settings.gamma_scale, tuple(s.role for s in pair.sources))
    # Every process reads the shards a dead launch left before any process writes its own (a shard being created
    # is no log yet): the meeting of `_together` is that barrier.
    done = _together(group, lambda: log.done() | {(run["prompt"], run["seed"]) for shard in _shards(path)
                                                   for run in _shard_runs(shard, settings)})
    if bar is not None:
        bar.update(len(done) * settings.steps)
    runner = Runner(pipe, pair, settings, bar)
    target = path if group.size == 1 else shard_path(path, group.rank)

    def run_share() -> None:
        if group.size > 1 and not target.exists():
            target.write_text(json.dumps(_header(log), separators=(",", ":")) + "\n")
        for prompts, seed in group.share(_batches(settings, done, batch_size)):
            records = runner.run(rule, prompts, seed)
            append_records(target, records)
            if group.size == 1:
                log.runs.extend(records)

    _together(group, run_share)
    return _fold_shards(path, log) if group.is_main else None


def _together(group: Group, work):
    """Run `work` on every process, then meet; if it failed anywhere, fail everywhere with the first error (so no
    process waits for one that is gone)."""
    try:
        result, problem = work(), None
    except LoraschedError as exc:
        result, problem = None, str(exc)
    problems = [p for p in group.gather(problem) if p is not None]
    if problems:
        raise LoraschedError(problems[0])
    return result


def _shard_runs(shard: Path, settings: Settings) -> list[dict]:
    log = read_log(shard)
    if log.settings != settings:
        raise LoraschedError(f"{shard}: calibration shard was made with other settings; remove it or give a new --log")
    return log.runs


def _fold_shards(path: Path, log: Log) -> Log:
    """Append every shard's runs to the log in single-process order, then drop the shards."""
    shards = _shards(path)
    if not shards:
        return log
    found = {(run["prompt"], run["seed"]): run for shard in shards for run in _shard_runs(shard, log.settings)}
    done = log.done()
    new = [found[key] for key in log.settings.runs() if key in found and key not in done]
    append_records(path, new)
    log.runs.extend(new)
    for shard in shards:
        shard.unlink()
    return log
