"""The time axis: where a denoiser call sits on a schedule, read from the timestep it is called with.

Its own module so that the replay hook, the online reference and every integration read time the same way, and
each can be tested against it rather than against one another. Import-light: torch only.
"""

from __future__ import annotations

import torch

from .errors import LoraschedError
from .schedule import AXES, AXIS_PROGRESS


def timestep_scale(pipe) -> float:
    """What a denoiser call's timestep must be multiplied by to be on the scheduler's scale: FLUX pipelines hand
    their transformer timestep / 1000 (read from the denoiser's class, since t = 1 is both FLUX's first call and
    the last timestep of an unshifted flow schedule)."""
    denoiser = getattr(pipe, "transformer", None)
    return 1000.0 if type(denoiser).__name__.startswith("Flux") else 1.0


class Clock:
    """Where a denoiser call sits on a schedule's time axis, read from the `timestep` it is called with.

    `progress`: the position of the timestep among the scheduler's distinct timesteps, n / N (img2img runs that
    start late map to the same p as a full run; second-order schedulers read the p of the timestep of each call).
    `noise`: 1 − t / T_train, independent of the step count and spacing. `scale` brings the call's timestep to the
    scheduler's scale (see `timestep_scale`).
    """

    def __init__(self, scheduler, axis: str = AXIS_PROGRESS, scale: float = 1.0) -> None:
        if axis not in AXES:
            raise LoraschedError(f"unknown time axis {axis!r}")
        self.scheduler, self.axis, self.scale = scheduler, axis, scale
        self.train_steps = float(getattr(scheduler, "config", {}).get("num_train_timesteps", 1000))
        self._source = None
        self._values: list[float] = []

    @classmethod
    def of(cls, pipe, axis: str = AXIS_PROGRESS) -> Clock:
        """The clock of a pipeline's denoiser calls."""
        return cls(pipe.scheduler, axis, timestep_scale(pipe))

    def _distinct(self) -> list[float]:
        timesteps = self.scheduler.timesteps
        if timesteps is not self._source:
            values = [float(t) for t in timesteps]
            self._values = [t for i, t in enumerate(values) if i == 0 or t != values[i - 1]]
            self._source = timesteps
        return self._values

    def timestep(self, timestep) -> float:
        """The call's timestep on the scheduler's scale."""
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        return t * self.scale

    def progress(self, t: float) -> float:
        values = self._distinct()
        if not values:
            raise LoraschedError("the scheduler has no timesteps set; call the pipeline, not the denoiser alone")
        return min((abs(v - t), i) for i, v in enumerate(values))[1] / len(values)

    def noise(self, t: float) -> float:
        return min(max(1.0 - t / self.train_steps, 0.0), 1.0)

    def __call__(self, timestep) -> float:
        t = self.timestep(timestep)
        return self.progress(t) if self.axis == AXIS_PROGRESS else self.noise(t)
