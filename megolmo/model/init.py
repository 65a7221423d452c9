"""Layout-independent initialisation: each parameter's *global* value depends only on the seed and
its global name; every rank draws the global tensor and keeps its own slice.

Drawing the whole tensor on every rank costs one global tensor of memory at a time (the largest is
the embedding) and makes TP=1 and TP=N start from bit-identical weights.
"""
from __future__ import annotations

import zlib

import torch
from torch import nn

from megolmo.parallel.layers import ShardSpec


def parameter_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def global_initial_value(name: str, spec: ShardSpec, seed: int, std: float) -> torch.Tensor:
    """The full (unpadded) tensor a parameter starts from: ones for norms, truncated normal otherwise."""
    if len(spec.global_shape) == 1:
        return torch.ones(spec.global_shape)
    generator = torch.Generator().manual_seed(parameter_seed(seed, name))
    value = torch.empty(spec.global_shape)
    return nn.init.trunc_normal_(value, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)


def local_slice_of(global_value: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """This rank's slice of a global tensor, zero-padded to ``spec.padded_size`` rows first."""
    if spec.dim is None:
        return global_value
    if spec.padded_size and spec.padded_size > global_value.shape[spec.dim]:
        pad_shape = list(global_value.shape)
        pad_shape[spec.dim] = spec.padded_size - global_value.shape[spec.dim]
        global_value = torch.cat([global_value, global_value.new_zeros(pad_shape)], dim=spec.dim)
    return global_value.narrow(spec.dim, spec.local_slice().start, spec.local_slice().stop - spec.local_slice().start)


@torch.no_grad()
def initialize_parameters(model: nn.Module, seed: int, std: float) -> None:
    for name, param in model.named_parameters():
        spec: ShardSpec = param.shard_spec
        param.copy_(local_slice_of(global_initial_value(name, spec, seed, std), spec))
