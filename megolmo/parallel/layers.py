"""Tensor-parallel building blocks: column/row-parallel linears and a vocab-parallel embedding.

Every parameter carries a ``ShardSpec`` telling how its local tensor sits inside the global one;
initialisation and checkpoints work on global tensors only, so neither depends on the TP size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megolmo.parallel.mappings import (
    Group, copy_to_tensor_parallel, gather_from_sequence_parallel, group_rank, group_size,
    reduce_from_tensor_parallel, reduce_scatter_to_sequence_parallel)


@dataclass(frozen=True)
class TensorParallel:
    """The TP group a layer belongs to, and whether activations outside TP regions are sequence-sharded."""

    group: Group = None
    sequence_parallel: bool = False

    @property
    def size(self) -> int:
        return group_size(self.group)

    @property
    def rank(self) -> int:
        return group_rank(self.group)


@dataclass(frozen=True)
class ShardSpec:
    """Where a local parameter sits in its global tensor.

    ``dim`` is the sharded dimension (None: replicated on every TP rank). ``global_shape`` is the
    logical shape saved in checkpoints; ``padded_size`` > global size along ``dim`` means the last
    rows are padding that exist only in memory (the vocabulary padding).
    """

    global_shape: tuple[int, ...]
    dim: int | None = None
    rank: int = 0
    world: int = 1
    padded_size: int | None = None

    def local_slice(self) -> slice:
        """The rows of the padded global tensor that this rank holds, along ``dim``."""
        full = self.padded_size or self.global_shape[self.dim]
        step = full // self.world
        return slice(self.rank * step, (self.rank + 1) * step)


def attach_spec(param: nn.Parameter, spec: ShardSpec) -> nn.Parameter:
    param.shard_spec = spec
    return param


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what}={total} is not divisible by the tensor-parallel size {parts}")
    return total // parts


def enter_tensor_parallel_region(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Make the full-sequence input of a TP region: all-gather under SP, else identity with an
    all-reduced gradient. Called once per sublayer, however many column-parallel layers read it."""
    if tp.sequence_parallel:
        return gather_from_sequence_parallel(x, tp.group)
    return copy_to_tensor_parallel(x, tp.group)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T`` with W split by output rows; the input must already be in the TP region
    (see ``enter_tensor_parallel_region``) and the output stays split."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        local_out = _divide(out_features, tp.size, "out_features")
        self.weight = attach_spec(nn.Parameter(torch.empty(local_out, in_features, dtype=dtype, device=device)),
                                  ShardSpec((out_features, in_features), 0, tp.rank, tp.size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """``y = x W^T`` with W split by input columns; partial outputs are summed across the TP group
    (reduce-scattered along the sequence under sequence parallelism)."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.tp = tp
        local_in = _divide(in_features, tp.size, "in_features")
        self.weight = attach_spec(nn.Parameter(torch.empty(out_features, local_in, dtype=dtype, device=device)),
                                  ShardSpec((out_features, in_features), 1, tp.rank, tp.size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        if self.tp.sequence_parallel:
            return reduce_scatter_to_sequence_parallel(partial, self.tp.group)
        return reduce_from_tensor_parallel(partial, self.tp.group)


def padded_vocab_size(vocab_size: int, multiple: int, tp_size: int) -> int:
    """Round the vocabulary up so every TP rank holds the same number of rows."""
    unit = multiple * tp_size
    return -(-vocab_size // unit) * unit


class _VocabSharded(nn.Module):
    """A ``[vocab, dim]`` weight whose padded vocabulary rows are split evenly across the TP group;
    ``valid_rows`` of this rank's ``rows`` are real vocabulary, the rest padding."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel, pad_multiple: int,
                 dtype: torch.dtype | None, device: torch.device | str | None):
        super().__init__()
        self.tp = tp
        padded = padded_vocab_size(vocab_size, pad_multiple, tp.size)
        self.rows = padded // tp.size
        self.vocab_start = tp.rank * self.rows
        self.valid_rows = max(0, min(self.rows, vocab_size - self.vocab_start))
        self.weight = attach_spec(nn.Parameter(torch.empty(self.rows, dim, dtype=dtype, device=device)),
                                  ShardSpec((vocab_size, dim), 0, tp.rank, tp.size, padded))


class VocabParallelEmbedding(_VocabSharded):
    """Embedding whose (padded) vocabulary rows are split across the TP group."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel, pad_multiple: int = 128,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__(vocab_size, dim, tp, pad_multiple, dtype, device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        # Each rank holds the rows of its vocabulary slice only: the partial embeddings are summed,
        # straight into sequence shards under sequence parallelism (one reduce-scatter, as Megatron
        # does, instead of an all-reduce followed by a split).
        if self.tp.sequence_parallel:
            return reduce_scatter_to_sequence_parallel(out, self.tp.group)
        return reduce_from_tensor_parallel(out, self.tp.group)


class VocabParallelHead(_VocabSharded):
    """The LM head: a column-parallel linear over the padded vocabulary whose logits stay split."""

    def __init__(self, dim: int, vocab_size: int, tp: TensorParallel, pad_multiple: int = 128,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__(vocab_size, dim, tp, pad_multiple, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(enter_tensor_parallel_region(x, self.tp), self.weight)


__all__ = ["TensorParallel", "ShardSpec", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "VocabParallelHead", "enter_tensor_parallel_region", "padded_vocab_size"]
