"""Layout-independent initialisation: each parameter's *global* value depends only on the seed and
its global name; every rank draws the global tensor and keeps its own slice.

Drawing the whole tensor on every rank costs one global tensor of memory at a time (the largest is
the embedding) and makes TP=1 and TP=N start from bit-identical weights. The values are those of
``nn.init.trunc_normal_`` (torch's rejection sampler); ``truncated_normal`` draws them 2.5 times
faster. A rank cannot draw only its slice of these values: torch's CPU generator (MT19937) is
sequential, so reaching an element costs drawing every element before it.

A job that loads a checkpoint draws nothing (``zero_padding_rows``): the checkpoint overwrites every
weight, so restarts skip the draw that dominates building a large stage.
"""
from __future__ import annotations

import zlib

import torch
from torch import nn

from megolmo.parallel.layers import ShardSpec


def parameter_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _outside(values: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return (values < lo) | (values > hi)


def truncated_normal(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """``nn.init.trunc_normal_(mean=0, a=-3 std, b=3 std)`` bit for bit, with the generator left where
    torch leaves it: each round redraws a full-size normal tensor as torch does, but only the elements
    still out of range are compared and replaced (torch re-masks and copies the whole tensor each round)."""
    lo, hi = (torch.tensor(bound, dtype=torch.float32).item() for bound in (-3 * std, 3 * std))
    value = torch.empty(shape).normal_(0.0, std, generator=generator)
    flat = value.view(-1)
    pending = _outside(flat, lo, hi).nonzero().squeeze(1)
    redraw = torch.empty_like(flat)
    while pending.numel():
        redraw.normal_(0.0, std, generator=generator)
        candidates = redraw[pending]
        flat[pending] = candidates
        pending = pending[_outside(candidates, lo, hi)]
    return value


def global_initial_value(name: str, spec: ShardSpec, seed: int, std: float) -> torch.Tensor:
    """The full (unpadded) tensor a parameter starts from: ones for norms, truncated normal otherwise."""
    if len(spec.global_shape) == 1:
        return torch.ones(spec.global_shape)
    return truncated_normal(spec.global_shape, std, torch.Generator().manual_seed(parameter_seed(seed, name)))


def local_slice_of(global_value: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """This rank's slice of a global tensor; its rows beyond the global ones (vocabulary padding) are zero.
    Only the local slice is padded, never a copy of the global tensor."""
    if spec.dim is None:
        return global_value
    rows, size = spec.local_slice(), global_value.shape[spec.dim]
    start = min(rows.start, size)
    held = global_value.narrow(spec.dim, start, min(rows.stop, size) - start)
    missing = rows.stop - rows.start - held.shape[spec.dim]
    if not missing:
        return held
    pad_shape = list(held.shape)
    pad_shape[spec.dim] = missing
    return torch.cat([held, held.new_zeros(pad_shape)], dim=spec.dim)


@torch.no_grad()
def initialize_parameters(model: nn.Module, seed: int, std: float) -> None:
    for name, param in model.named_parameters():
        spec: ShardSpec = param.shard_spec
        param.copy_(local_slice_of(global_initial_value(name, spec, seed, std), spec))


@torch.no_grad()
def zero_padding_rows(model: nn.Module) -> None:
    """For a model whose weights a checkpoint will fill: leave them undrawn, and zero only the vocabulary
    padding rows, which checkpoints never hold (a fresh start has them zero too)."""
    for param in model.parameters():
        spec: ShardSpec = param.shard_spec
        if spec.padded_size:
            local_rows = param.shape[spec.dim]
            first = max(0, min(local_rows, spec.global_shape[spec.dim] - spec.local_slice().start))
            param.narrow(spec.dim, first, local_rows - first).zero_()
