"""FP8 training through torchao's float8 linears, for the plain-torch back-end.

torchao's ``Float8Linear`` replaces our local GEMMs (every column- and row-parallel linear; the
vocabulary head and embedding stay BF16). The TP collectives stay in the sublayers, so nothing about
the parallel layout changes. Scaling is dynamic and tensor-wise (torchao's default: "current"
scaling, computed from each tensor as it is cast). Blocks listed in ``bf16_layers`` are left alone.
"""
from __future__ import annotations

import logging

from torch import nn

from megolmo.kernels.swap import layer_id
from megolmo.parallel.layers import ColumnParallelLinear, RowParallelLinear


def convert_to_float8(model: nn.Module, bf16_layers: frozenset[int]) -> list[str]:
    """Swap the block linears of ``model`` for torchao ``Float8Linear`` modules (same weight tensors);
    returns the converted names."""
    logging.getLogger("torchao").setLevel(logging.ERROR)  # it logs every optional CUDA extension it lacks
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    converted: list[str] = []

    def wanted(module: nn.Module, name: str) -> bool:
        keep = isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and layer_id(name) not in bf16_layers
        if keep:
            converted.append(name)
        return keep

    convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=wanted)
    return converted
