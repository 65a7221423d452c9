"""The non-finite guard: a step whose loss or gradient norm is NaN or infinite is applied on no rank.

Applied, a NaN norm makes the clip factor NaN and AdamW writes NaN into every weight, master and moment. So
such a step is withheld on every rank (``TrainStep.withheld`` agrees on it: a NaN in one rank's gradients
reaches only its tensor-parallel group's norm when ZeRO is off), the schedule does not advance, and
``optim.max_nonfinite_steps`` of them in a row stop the job with an error naming the step and the first
gradient holding a NaN or an infinity. Gradients are scanned only then: finite steps cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megolmo.errors import MegolmoConfigError, TrainingDivergedError
from megolmo.optim.adamw import DistributedAdamW


@dataclass
class NonFiniteSteps:
    """The trainer's count of non-finite steps: in a row (kept across a resume, like the schedule) and in all."""

    limit: int
    in_a_row: int = 0
    total: int = 0

    def count(self, nonfinite: bool) -> bool:
        """Count one step; whether it makes ``limit`` non-finite steps in a row."""
        self.in_a_row = self.in_a_row + 1 if nonfinite else 0
        self.total += nonfinite
        return self.in_a_row >= self.limit

    def skipped_line(self, step: int) -> str:
        return (f"step {step}: non-finite loss or grad norm: update skipped on every rank "
                f"({self.in_a_row} in a row)")

    def diverged(self, step: int, culprits: list[str | None]) -> TrainingDivergedError:
        """The error of the step that reached the limit; ``culprits``: each global rank's first non-finite
        gradient (``first_nonfinite_gradient``), the lowest rank's is named."""
        found = next(((rank, name) for rank, name in enumerate(culprits) if name is not None), None)
        where = (f"first non-finite gradient: {found[1]} on rank {found[0]}" if found is not None
                 else "no rank's gradient holds a NaN or an infinity")
        return TrainingDivergedError(f"step {step}: {self.in_a_row} steps in a row with a non-finite loss or grad "
                                     f"norm (optim.max_nonfinite_steps={self.limit}); {where}")

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.in_a_row, self.total = int(state["in_a_row"]), int(state["total"])


def nonfinite_steps(limit: int) -> NonFiniteSteps:
    """``optim.max_nonfinite_steps`` checked."""
    if limit < 1:
        raise MegolmoConfigError(f"optim.max_nonfinite_steps={limit}: must be >= 1")
    return NonFiniteSteps(int(limit))


@torch.no_grad()
def first_nonfinite_gradient(optimizer: DistributedAdamW) -> str | None:
    """The first parameter, in model order, whose gradient holds a NaN or an infinity in the part this rank's
    optimizer reads (its shard under ZeRO); None when there is none."""
    bad = {segment.name for grad, segments in zip(optimizer.grad_shards(), optimizer.segments)
           for segment in segments if not torch.isfinite(grad[segment.start:segment.end]).all()}
    return next((slot.name for slot in reversed(optimizer.buffers.slots) if slot.name in bad), None)
