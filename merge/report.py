"""Human-readable views of a scheduled file: the summary and per-layer table that `lorasched inspect` prints."""

from __future__ import annotations

import math
import os

from . import rules
from .fileformat import KEY_VERSION, ScheduledFile
from .schedule import AXIS_PROGRESS, REFERENCE_STEPS, Schedule


def first_step(p: float, steps: int) -> int:
    """The first step n (of `steps`) whose progress n / steps reaches p: where a switch at p takes effect."""
    return math.ceil(p * steps - 1e-12)


def source_labels(roles: tuple[str, ...]) -> list[str]:
    """Each source's short name: its role, numbered when the file has several of that role (`subject2`)."""
    return [role if roles.count(role) == 1 else f"{role}{roles[:i].count(role) + 1}" for i, role in enumerate(roles)]


def selection_label(selection: tuple[int, ...], labels: list[str]) -> str:
    """`style`, `subject1+style`; `both` for a pair's two, `none` where no LoRA is active."""
    if not selection:
        return "none"
    if labels == ["subject", "style"] and selection == (0, 1):
        return "both"
    return "+".join(labels[i] for i in selection)


def describe_phases(phases, steps: int, schedule: Schedule, labels: list[str]) -> str:
    """`subject → style at p=0.350 (step 7)`; on the noise axis `at q=…` with the calibration step it begins."""
    if len(phases) == 1:
        return f"{selection_label(phases[0][1], labels)} throughout"
    parts = [selection_label(phases[0][1], labels)]
    for start, selection in phases[1:]:
        source = selection_label(selection, labels)
        if schedule.axis == AXIS_PROGRESS:
            parts.append(f"→ {source} at p={start:.3f} (step {first_step(start, steps)})")
        else:
            parts.append(f"→ {source} at q={start:.3f} (step {schedule.bins.index(start)})")
    return " ".join(parts)


def summary_lines(scheduled: ScheduledFile) -> list[str]:
    schedule = scheduled.schedule
    params = dict(scheduled.params)
    steps = int(params.pop("steps", REFERENCE_STEPS))
    calibration = params.pop("calibration", None)
    probe = params.pop("beta_source", None)
    search = params.pop("balance", None)
    reduced = params.pop("rank", None)
    gammas, norms, balances = params.pop("gammas", None), params.pop("norms", None), params.pop("balances", None)
    labels = source_labels(scheduled.roles)
    setting = rules.get(scheduled.method).setting(params)
    switching = sum(1 for phases in schedule.layers.values() if len(phases) > 1)
    size_mb = os.path.getsize(scheduled.path) / 2**20
    lines = [
        f"file        {scheduled.path} ({size_mb:.2f} MiB, lorasched format {scheduled.metadata[KEY_VERSION]})",
        f"method      {scheduled.method}  {setting}".rstrip(),
    ]
    if isinstance(probe, dict):
        lines.append(f"probe β     1 − cos = 1 − {probe['similarity']:.4f} by {probe['embedder']} on "
                     f"{probe['prompt']!r} (seed {probe['seed']}, {probe['steps']} steps)")
    if calibration:
        lines.append(
            f"calibration {len(calibration['prompts'])} prompts × seeds {calibration['seeds']}, {steps} steps, "
            f"{calibration['size']} px, guidance {calibration['guidance']:g}; mean agreement "
            f"{calibration['mean_agreement']:.1%}; log {calibration['log']}"
        )
    if search:
        lines += balance_lines(search)
    if gammas:
        lines.append("pairings    γ " + ", ".join(f"{labels[i]}·{labels[j]} {gamma:.4g}" for i, j, gamma in gammas)
                     + "; masses " + ", ".join(f"{labels[i]} {norm:.4g}" for i, norm in enumerate(norms)
                                                   if scheduled.roles[i] != "static"))
    if balances:
        lines.append("balances    b " + ", ".join(f"{labels[i]} {b:.4g}" for i, b in enumerate(balances)
                                                 if b is not None))
    if reduced:
        errors = reduced["errors"]
        asked = f"--rank {reduced['request']}" if reduced["request"] else "LyCORIS layers capped at half min(out, in)"
        lines.append(f"rank        {asked}: {len(errors)} layers re-factorised, worst relative error "
                     f"{reduced['max_error']:.3%}" + (f" ({max(errors, key=lambda name: max(errors[name]))})"
                                                      if errors else ""))
    for label, source in zip(labels, scheduled.sources):
        lines.append(f"{label:<11} {source.file}  sha256 {source.sha256[:12]}  {source.dtype}"
                     + (f"  strength {source.strength:g}" if source.strength != 1.0 else ""))
    axis = (f"step numbers below are for {steps} steps" if schedule.axis == AXIS_PROGRESS
            else "time axis: noise level q = 1 − t/T, steps as in calibration")
    lines.append(
        f"layers      {len(schedule.layers)} ({switching} switch, {len(schedule.layers) - switching} constant); {axis}"
    )
    return lines


OBJECTIVES = {"harmonic_clip": "harmonic mean of CLIP subject and style fidelity"}


def knobs(candidate: dict) -> str:
    """`β=0.5 γ×2` (feature-kl: `γ×2`): a balance candidate's setting."""
    beta = "" if candidate.get("beta") is None else f"β={candidate['beta']:.4g} "
    return f"{beta}γ×{candidate['gamma_scale']:g}"


def balance_lines(search: dict) -> list[str]:
    """The `--balance auto` search: its probes, each candidate's scores, and the one chosen (marked *)."""
    chosen = search["chosen"]
    objective = OBJECTIVES.get(search["objective"], search["objective"])
    summary = f"balance     auto: {knobs(chosen)} of {len(search['candidates'])} candidates, best {objective}"
    probes = (f"{'':12}probes {len(search['prompts'])} prompt(s) × seeds {search['seeds']}, {search['steps']} steps, "
              f"{search['size']} px; CLIP {search['clip']}, DINO {search['dino']}; log {search['log']}")
    header = (f"{'':14}{'candidate':<16}{'subject CLIP':>13}{'style CLIP':>12}{'harmonic':>10}{'subject DINO':>14}"
              f"{'style DINO':>12}")
    lines = [summary, probes, header]
    for candidate in search["candidates"]:
        scores = candidate["scores"]
        mark = "*" if all(candidate.get(k) == chosen.get(k) for k in ("beta", "gamma_scale")) else " "
        lines.append(
            f"{'':12}{mark} {knobs(candidate):<16}{scores.get('subject_clip', math.nan):>13.4f}"
            f"{scores.get('style_clip', math.nan):>12.4f}{scores.get('harmonic_clip', math.nan):>10.4f}"
            f"{scores.get('subject_dino', math.nan):>14.4f}{scores.get('style_dino', math.nan):>12.4f}"
        )
    return lines


def table_lines(scheduled: ScheduledFile, max_layers: int | None = None) -> list[str]:
    schedule = scheduled.schedule
    steps = int(scheduled.params.get("steps", REFERENCE_STEPS))
    names = sorted(schedule.layers)
    width = max(len(name) for name in names)
    labels = source_labels(scheduled.roles)
    heading = "static c/s" if labels == ["subject", "style"] else "static " + "/".join(labels)
    errors = scheduled.params.get("rank", {}).get("errors", {})  # --rank: each source's relative error
    ranks = "ranks" + (" (error)" if errors else "")
    lines = [f"{'layer':<{width}}  {heading}  {ranks:<12}  schedule"]
    for name in names[:max_layers]:
        record = scheduled.modules[name]
        static = "/".join(f"{weight:.2f}" for weight in record.static)
        rank = "/".join(map(str, record.ranks)) + (
            " (" + "/".join(f"{error:.1%}" for error in errors[name]) + ")" if name in errors else "")
        phases = describe_phases(schedule.layers[name], steps, schedule, labels)
        lines.append(f"{name:<{width}}  {static:<{len(heading)}}  {rank:<12}  {phases}")
    if max_layers is not None and len(names) > max_layers:
        lines.append(f"… {len(names) - max_layers} more layers (--max-layers to show more)")
    return lines


def decided_layers(scheduled: ScheduledFile) -> list[str]:
    """The denoiser layers a rule decides: those with calibration votes or recorded scores; for a rule without
    either, every layer outside the text encoders that carries a subject and a style."""
    schedule = scheduled.schedule
    if schedule.agreement is not None:
        return sorted(schedule.agreement)
    scored = sorted(name for name, record in scheduled.modules.items() if record.scores is not None)

    def carries(record: dict, role: str) -> bool:
        return any(rank for rank, r in zip(record.ranks, scheduled.roles) if r == role)

    return scored or sorted(
        name for name, record in scheduled.modules.items()
        if carries(record, "subject") and carries(record, "style") and not name.startswith("text_encoder")
    )
