"""Pictures of a schedule, layers × denoising steps: which LoRA each layer runs, and how well a schedule agrees
with its rule (`inspect --png`, `verify --report`).

Drawn with matplotlib (Agg, no display). Rows are layers, labelled and grouped by block (down/mid/up for UNets,
double/single blocks for FLUX, joint blocks for SD3) with a rule between groups; columns are steps with ticks,
and for calibrated schedules their noise level too. Many layers are split into side-by-side panels, so 700
layers keep a readable row height.
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import LoraschedError
from .fileformat import ScheduledFile
from .report import selection_label, source_labels
from .schedule import AXIS_PROGRESS, Schedule

NAMED_COLORS = {"subject": "#e68c28", "style": "#3c6ec8", "both": "#9a5aaa", "none": "#dddddd"}  # a pair's, and no LoRA
ROWS_PER_PANEL = 160
ROW_INCHES = 0.12


def columns(schedule: Schedule, steps: int) -> list[float]:
    """Time coordinates to sample: each step's progress, or each calibration bin's start on the noise axis."""
    if schedule.axis == AXIS_PROGRESS or schedule.bins is None:
        return [n / steps for n in range(steps)]
    return list(schedule.bins)


def schedule_cells(schedule: Schedule, layers: list[str], steps: int) -> list[list[tuple[int, ...]]]:
    """The picture's content: per layer, the sources active at each column (step or calibration bin)."""
    times = columns(schedule, steps)
    return [[schedule.active(name, at) for at in times] for name in layers]


def block_of(name: str) -> tuple[str, str]:
    """(block, rest of the name): `unet.down_blocks.1.attentions.0…` -> (`down_blocks.1`, `attentions.0…`)."""
    parts = name.split(".")[1:]
    depth = 1 if parts[0] in ("mid_block", "conv_in", "conv_out", "time_embedding", "add_embedding") else 2
    return ".".join(parts[:depth]), ".".join(parts[depth:]) or parts[-1]


def split_panels(layers: list[str]) -> list[list[str]]:
    """Layers in order, split into as few equal panels as keep each under ROWS_PER_PANEL rows."""
    count = math.ceil(len(layers) / ROWS_PER_PANEL)
    size = math.ceil(len(layers) / count)
    return [layers[start:start + size] for start in range(0, len(layers), size)]


def _title(scheduled: ScheduledFile, what: str) -> str:
    params = {k: v for k, v in scheduled.params.items() if not isinstance(v, (dict, list))}
    shown = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))
    return f"{Path(scheduled.path).name}: {what}\nmethod {scheduled.method}  {shown}"


def _figure(layers: list[str], times: list[float], schedule: Schedule, title: str, draw_panel, colorbar=None):
    """One panel per group of blocks; `draw_panel(axes, rows)` paints a panel's cells and returns its image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = split_panels(layers)
    tallest = max(len(panel) for panel in panels)
    label_chars = max(len(block_of(name)[1]) for name in layers)
    panel_width = 0.075 * label_chars + max(2.5, 0.1 * len(times)) + 1.2
    figure, axes_row = plt.subplots(1, len(panels), squeeze=False, layout="constrained",
                                    figsize=(panel_width * len(panels) + 1.0, ROW_INCHES * tallest + 2.4))
    font = 6 if tallest > 60 else 8
    for axes, panel in zip(axes_row[0], panels):
        image = draw_panel(axes, panel)
        axes.set_yticks(range(len(panel)), [block_of(name)[1] for name in panel], fontsize=font)
        axes.set_ylim(tallest - 0.5, -0.5)
        blocks = [block_of(name)[0] for name in panel]
        for row, (above, below) in enumerate(zip(blocks, blocks[1:]), start=1):
            if above != below:
                axes.axhline(row - 0.5, color="black", linewidth=0.8)
        groups = {block: [i for i, b in enumerate(blocks) if b == block] for block in dict.fromkeys(blocks)}
        right = axes.twinx()  # block names on the right, at each group's middle
        right.set_ylim(axes.get_ylim())
        right.set_yticks([(rows[0] + rows[-1]) / 2 for rows in groups.values()], list(groups), fontsize=font + 1,
                         fontweight="bold")
        right.tick_params(length=0)
        stride = max(1, math.ceil(len(times) / (12 if schedule.axis == AXIS_PROGRESS else 6)))
        ticks = list(range(0, len(times), stride))
        if schedule.axis == AXIS_PROGRESS:
            axes.set_xticks(ticks, [str(n) for n in ticks], fontsize=font + 1)
            axes.set_xlabel("denoising step", fontsize=font + 2)
        else:
            axes.set_xticks(ticks, [f"{n}\nq={times[n]:.2f}" for n in ticks], fontsize=font)
            axes.set_xlabel("calibration bin (noise level q = 1 − t/T)", fontsize=font + 2)
        axes.set_xlim(-0.5, len(times) - 0.5)
    if colorbar is not None:
        colorbar(figure, image, axes_row[0].tolist())
    figure.suptitle(title, fontsize=9)
    return figure


def _save(figure, path) -> None:
    import matplotlib.pyplot as plt

    path = Path(path)
    if not path.parent.resolve().is_dir():
        plt.close(figure)
        raise LoraschedError(f"{path}: folder {path.parent} does not exist")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def draw_schedule(scheduled: ScheduledFile, layers: list[str], steps: int, path) -> None:
    """Each layer's active source per step (or calibration bin), with a legend."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    schedule = scheduled.schedule
    times = columns(schedule, steps)
    cells = dict(zip(layers, schedule_cells(schedule, layers, steps)))
    labels = source_labels(scheduled.roles)
    shown = sorted({selection for row in cells.values() for selection in row}, key=lambda s: (len(s), s))
    names = [selection_label(selection, labels) for selection in shown]
    import matplotlib

    palette = matplotlib.colormaps["tab20"]
    unnamed = iter(range(len(names)))
    colors = [NAMED_COLORS.get(name) or palette(next(unnamed) % 20) for name in names]
    colormap = ListedColormap(colors)
    codes_of = {selection: code for code, selection in enumerate(shown)}

    def panel(axes, rows):
        codes = [[codes_of[selection] for selection in cells[name]] for name in rows]
        return axes.imshow(codes, cmap=colormap, vmin=-0.5, vmax=len(shown) - 0.5, aspect="auto",
                           interpolation="nearest")

    what = (f"active LoRA per layer and step ({steps} steps)" if schedule.axis == AXIS_PROGRESS
            else "active LoRA per layer and calibration bin")
    figure = _figure(layers, times, schedule, _title(scheduled, what), panel)
    figure.legend(handles=[Patch(color=color, label=name) for color, name in zip(colors, names)],
                  loc="outside lower center", fontsize=8, ncols=min(len(names), 4))
    _save(figure, path)


def draw_agreement(scheduled: ScheduledFile, grid: list[list[float]], layers: list[str], steps: int, path) -> None:
    """How often the online rule chose what the schedule replays, per layer and step, with a colour bar."""
    schedule = scheduled.schedule
    times = [n / steps for n in range(steps)]
    by_layer = dict(zip(layers, grid))

    def panel(axes, rows):
        return axes.imshow([by_layer[name] for name in rows], cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto",
                           interpolation="nearest")

    def colorbar(figure, image, axes):
        figure.colorbar(image, ax=axes, location="bottom", shrink=0.6, aspect=40,
                        label="share of runs where replay and the online rule agree")

    stepped = Schedule(layers=schedule.layers)  # verify counts steps, whatever the schedule's own axis
    figure = _figure(layers, times, stepped, _title(scheduled, "agreement of replay with the online rule"), panel,
                     colorbar)
    _save(figure, path)
