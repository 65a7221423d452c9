"""SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``, gate/up column-parallel, down row-parallel."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megolmo.model.config import ModelConfig
from megolmo.parallel.layers import (ColumnParallelLinear, RowParallelLinear, TensorParallel,
                                     enter_tensor_parallel_region, exit_tensor_parallel_region)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, device=None):
        super().__init__()
        if cfg.intermediate_size % tp.size:
            raise ValueError(f"model.intermediate_size={cfg.intermediate_size} is not divisible by "
                             f"parallel.tensor={tp.size}")
        self.tp = tp
        self.gate_proj = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, tp, device=device)
        self.up_proj = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, tp, device=device)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, tp, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_tensor_parallel_region(x, self.tp)
        return exit_tensor_parallel_region(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), self.tp)
