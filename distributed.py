"""Data-parallel runs: which share of the work this process does, and waiting for the others.

Under `accelerate launch -m lorasched …` (or torchrun) every process runs the same command; Hugging Face
accelerate's `PartialState` knows the rank, the world size and the process's own device (`cuda:{local_rank}`, or
the CPU) and sets up torch.distributed (gloo on CPU, nccl on GPUs). A plain single-process run never imports
accelerate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    """This process's place among the processes of one launch."""

    rank: int = 0
    size: int = 1
    device: str | None = None  # the launcher's device for this process; None: let the user's --device decide

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This process's items: every size-th one from its rank, so shares differ by at most one item."""
        return items[self.rank :: self.size]

    def gather(self, item) -> list:
        """Every process's `item`, in rank order (on every process)."""
        if self.size == 1:
            return [item]
        from accelerate.utils import gather_object

        return gather_object([item])


def current() -> Group:
    """The launch this process belongs to, from the launcher's environment (WORLD_SIZE, RANK, …)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Group()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # accelerate shares CPU processes only when asked
    device = "cpu" if state.device.type == "cpu" else str(state.device)
    return Group(state.process_index, state.num_processes, device)
