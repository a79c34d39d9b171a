"""Human-readable views of a scheduled file: the summary and per-layer table that `lorasched inspect` prints."""

from __future__ import annotations

import math
import os

from .fileformat import ScheduledFile
from .schedule import Schedule


def first_step(p: float, steps: int) -> int:
    """The first step n (of `steps`) whose progress n / steps reaches p: where a switch at p takes effect."""
    return math.ceil(p * steps - 1e-12)


def describe_phases(phases, steps: int) -> str:
    if len(phases) == 1:
        return f"{phases[0][1]} throughout"
    parts = [phases[0][1]]
    for start, source in phases[1:]:
        parts.append(f"→ {source} at p={start:.3f} (step {first_step(start, steps)})")
    return " ".join(parts)


def summary_lines(scheduled: ScheduledFile, schedule: Schedule) -> list[str]:
    params = dict(scheduled.params)
    steps = int(params.pop("steps", 30))
    setting = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))
    switching = sum(1 for phases in schedule.layers.values() if len(phases) > 1)
    size_mb = os.path.getsize(scheduled.path) / 2**20
    lines = [
        f"file        {scheduled.path} ({size_mb:.2f} MiB, lorasched format {scheduled.metadata['lorasched.format_version']})",
        f"method      {scheduled.method}  {setting}".rstrip(),
    ]
    for role, source in sorted(scheduled.sources.items(), reverse=True):
        lines.append(f"{role:<11} {source['file']}  sha256 {source['sha256'][:12]}  {source['dtype']}")
    lines.append(
        f"layers      {len(schedule.layers)} ({switching} switch, {len(schedule.layers) - switching} constant);"
        f" step numbers below are for {steps} steps"
    )
    return lines


def table_lines(scheduled: ScheduledFile, schedule: Schedule, max_layers: int | None = None) -> list[str]:
    steps = int(scheduled.params.get("steps", 30))
    names = sorted(schedule.layers)
    width = max(len(name) for name in names)
    lines = [f"{'layer':<{width}}  static c/s   schedule"]
    for name in names[:max_layers]:
        c_subject, c_style = scheduled.modules[name]["static"]
        lines.append(f"{name:<{width}}  {c_subject:.2f}/{c_style:.2f}  {describe_phases(schedule.layers[name], steps)}")
    if max_layers is not None and len(names) > max_layers:
        lines.append(f"… {len(names) - max_layers} more layers (--max-layers to show more)")
    return lines
