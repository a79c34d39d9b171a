"""The time axis: where a denoiser call sits on a schedule, read from the timestep it is called with.

Its own module so that the replay hook, the online reference and every integration read time the same way, and
each can be tested against it rather than against one another. Import-light: torch only.
"""

from __future__ import annotations

import torch

from .schedule import AXES, AXIS_PROGRESS


class Clock:
    """Where a denoiser call sits on a schedule's time axis, read from the `timestep` it is called with.

    `progress`: the position of the timestep among the scheduler's distinct timesteps, n / N (second-order
    schedulers that call twice per step, and img2img runs that start late, map to the same p as a full run).
    `noise`: 1 − t / T_train, independent of the step count and spacing. Transformers that receive timestep / 1000
    (FLUX) are matched on the scheduler's scale too.
    """

    def __init__(self, scheduler, axis: str = AXIS_PROGRESS) -> None:
        if axis not in AXES:
            raise ValueError(f"unknown time axis {axis!r}")
        self.scheduler, self.axis = scheduler, axis
        self.train_steps = float(getattr(scheduler, "config", {}).get("num_train_timesteps", 1000))
        self._source = None
        self._values: list[float] = []

    def _distinct(self) -> list[float]:
        timesteps = self.scheduler.timesteps
        if timesteps is not self._source:
            values = [float(t) for t in timesteps]
            self._values = [t for i, t in enumerate(values) if i == 0 or t != values[i - 1]]
            self._source = timesteps
        return self._values

    def timestep(self, timestep) -> float:
        """The call's timestep on the scheduler's scale."""
        values = self._distinct()
        if not values:
            raise RuntimeError("the scheduler has no timesteps set; call the pipeline, not the denoiser alone")
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if max(values) > 1.5 >= t:  # t / 1000 (FLUX), or simply a late timestep such as 1: the closer one wins
            scaled = t * 1000.0
            if min(abs(v - scaled) for v in values) < min(abs(v - t) for v in values):
                return scaled
        return t

    def progress(self, t: float) -> float:
        values = self._distinct()
        return min((abs(v - t), i) for i, v in enumerate(values))[1] / len(values)

    def noise(self, t: float) -> float:
        return min(max(1.0 - t / self.train_steps, 0.0), 1.0)

    def __call__(self, timestep) -> float:
        t = self.timestep(timestep)
        return self.progress(t) if self.axis == AXIS_PROGRESS else self.noise(t)
