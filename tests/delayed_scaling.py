"""A CPU module with the kind of state Transformer Engine's FP8 linears keep (TE needs CUDA even to
import): delayed scaling. Its input is rounded to 8-bit steps under a scale taken from the largest of
the last ``HISTORY`` input amaxes, and that history lives in ``get_extra_state``, as TE's does, so a
run resumed without it computes differently from the run it continues."""
from __future__ import annotations

import os

import torch
from torch import nn

from megolmo.kernels.swap import carry_parameter, swap_modules
from megolmo.parallel.layers import ColumnParallelLinear, RowParallelLinear

HISTORY = 8


class DelayedScalingLinear(nn.Linear):
    def __init__(self, old: nn.Linear):
        super().__init__(old.in_features, old.out_features, bias=False, dtype=old.weight.dtype)
        carry_parameter(old.weight, self.weight)
        self.amax_history = torch.zeros(HISTORY)
        self.pickle_opt_in_at_load: str | None = None  # what TE 2.x's unpickling guard would have seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = float(self.amax_history.max()) or 1.0  # TE starts every scale at 1
        steps = (x / scale * 127).round().clamp(-127, 127) * (scale / 127)
        if self.training:
            self.amax_history = torch.roll(self.amax_history, 1)
            self.amax_history[0] = x.detach().abs().max().float()
        return super().forward(x + (steps - x).detach())  # straight-through gradient

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {"amax_history": self.amax_history.clone()}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.amax_history = state["amax_history"].clone()
        self.pickle_opt_in_at_load = os.environ.get("NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE")


def use_delayed_scaling(model: nn.Module) -> list[str]:
    return swap_modules(model, lambda _, m: isinstance(m, (ColumnParallelLinear, RowParallelLinear)),
                        DelayedScalingLinear)
