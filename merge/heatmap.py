"""Heatmap PNGs, layers × time: which LoRA each layer runs, and how well a schedule agrees with its rule.

Drawn with Pillow (already a diffusers dependency): one row per decided layer, one column per step or time bin,
a legend line at the top. Meant for eyeballing where a schedule switches, not for publication.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from .errors import LoraschedError
from .lora import BOTH, STYLE, SUBJECT
from .schedule import AXIS_PROGRESS, Schedule

COLORS = {SUBJECT: (230, 140, 40), STYLE: (60, 110, 200), BOTH: (150, 90, 170)}
LEGEND_HEIGHT = 14


def columns(schedule: Schedule, steps: int) -> list[float]:
    """Time coordinates to sample: each step's progress, or each calibration bin's start on the noise axis."""
    if schedule.axis == AXIS_PROGRESS or schedule.bins is None:
        return [n / steps for n in range(steps)]
    return list(schedule.bins)


def _canvas(rows: int, cols: int, legend: str) -> tuple[Image.Image, int, int]:
    cell_w = max(4, 480 // max(cols, 1))
    cell_h = max(2, min(12, 720 // max(rows, 1)))
    image = Image.new("RGB", (max(cols * cell_w, 320), rows * cell_h + LEGEND_HEIGHT), "white")
    ImageDraw.Draw(image).text((2, 1), legend, fill="black")
    return image, cell_w, cell_h


def _save(image: Image.Image, path) -> None:
    path = Path(path)
    if not path.parent.resolve().is_dir():
        raise LoraschedError(f"{path}: folder {path.parent} does not exist")
    image.save(path)


def draw_schedule(schedule: Schedule, layers: list[str], steps: int, path) -> None:
    """Each layer's active source per step (or bin)."""
    times = columns(schedule, steps)
    image, w, h = _canvas(len(layers), len(times), "orange subject, blue style, purple both; time ->")
    draw = ImageDraw.Draw(image)
    for row, layer in enumerate(layers):
        for col, at in enumerate(times):
            y = LEGEND_HEIGHT + row * h
            draw.rectangle([col * w, y, (col + 1) * w - 1, y + h - 1], fill=COLORS[schedule.active(layer, at)])
    _save(image, path)


def draw_agreement(values: list[list[float]], path, legend: str = "agreement: green 100%, red 50% or less") -> None:
    """A grid of fractions in [0, 1]: green at 1, red at 0.5 or below."""
    image, w, h = _canvas(len(values), max((len(row) for row in values), default=0), legend)
    draw = ImageDraw.Draw(image)
    for row, shares in enumerate(values):
        for col, share in enumerate(shares):
            level = min(max((share - 0.5) * 2, 0.0), 1.0)
            y = LEGEND_HEIGHT + row * h
            color = (int(220 * (1 - level)), int(60 + 140 * level), 60)
            draw.rectangle([col * w, y, (col + 1) * w - 1, y + h - 1], fill=color)
    _save(image, path)
