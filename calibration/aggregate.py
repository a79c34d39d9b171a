"""From a calibration log to one Schedule on the noise axis: per layer and time bin, the majority choice.

Bins are the calibration's own noise levels, each reaching halfway to its neighbours, so a replay at another
step count or scheduler looks up the bin its noise level falls in. The share of votes the kept choice got is the
bin's agreement, stored with the schedule. `min_run` suppresses switches: a run of fewer than `min_run` bins
takes the choice of the run before it (the first run, of the run after it).
"""

from __future__ import annotations

from collections import Counter

from ..merge.errors import LoraschedError
from ..merge.lora import LoraSet
from ..merge.schedule import AXIS_NOISE, Schedule, fixed_phases
from .online import CODES, DIGITS
from .runner import Log

SOURCE_OF = {code: selection for selection, code in CODES.items()} | {d: (i,) for i, d in enumerate(DIGITS)}
PREFERENCE = ("c", "s", "b", "n", *DIGITS)  # tie order among equally many votes (max keeps the first)


def _level(call: dict) -> float:
    """A call's noise level, rounded so that equal levels from different runs fall in one bin."""
    return round(call["q"], 9)


def noise_levels(log: Log) -> list[float]:
    """The distinct noise levels the calibration visited, ascending."""
    return sorted({_level(call) for run in log.runs for call in run["calls"]})


def votes(log: Log, levels: list[float]) -> list[list[Counter]]:
    """votes[layer index][bin index]: how often each choice code was taken."""
    index = {q: i for i, q in enumerate(levels)}
    counts = [[Counter() for _ in levels] for _ in log.layers]
    for run in log.runs:
        for call in run["calls"]:
            b = index[_level(call)]
            for layer, code in enumerate(call["choices"]):
                counts[layer][b][code] += 1
    return counts


def _runs(codes: list[str]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, code in enumerate(codes):
        if runs and codes[runs[-1][-1]] == code:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def suppress_short_runs(codes: list[str], min_run: int) -> list[str]:
    """Give every run shorter than `min_run` bins the choice of its predecessor (of its successor, if first)."""
    codes = list(codes)
    while True:
        runs = _runs(codes)
        short = next((i for i, run in enumerate(runs) if len(run) < min_run and len(runs) > 1), None)
        if short is None:
            return codes
        neighbour = runs[short - 1] if short > 0 else runs[short + 1]
        for i in runs[short]:
            codes[i] = codes[neighbour[0]]


def aggregate(log: Log, pair: LoraSet, min_run: int = 1) -> Schedule:
    """The consensus schedule of a log, with per-bin agreement and the bin starts."""
    if not log.runs:
        raise LoraschedError("the calibration log holds no finished runs")
    levels = noise_levels(log)
    starts = [0.0] + [(a + b) / 2 for a, b in zip(levels, levels[1:])]
    counts = votes(log, levels)
    layers, agreement = {}, {}
    for name, bins in zip(log.layers, counts):
        majority = [max(PREFERENCE, key=votes_of.__getitem__) for votes_of in bins]
        kept = suppress_short_runs(majority, min_run)
        agreement[name] = tuple(c[code] / max(sum(c.values()), 1) for c, code in zip(bins, kept))
        phases = []
        for start, code in zip(starts, kept):
            if not phases or phases[-1][1] != SOURCE_OF[code]:
                phases.append((start, SOURCE_OF[code]))
        layers[name] = tuple(phases)
    for name in pair.module_names:
        if name not in layers:
            layers[name] = fixed_phases(name, pair)
    return Schedule(layers=layers, axis=AXIS_NOISE, agreement=agreement, bins=tuple(starts))
