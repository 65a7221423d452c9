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


def exit_tensor_parallel_region(partial: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Sum the row-parallel partial outputs of a TP region: an all-reduce, or a reduce-scatter along
    the sequence under SP. The closing twin of ``enter_tensor_parallel_region``."""
    if tp.sequence_parallel:
        return reduce_scatter_to_sequence_parallel(partial, tp.group)
    return reduce_from_tensor_parallel(partial, tp.group)


class _LocalLinear(nn.Linear):
    """A bias-free GEMM on this rank's shard, and nothing else: the collectives live in the sublayer
    (``enter_``/``exit_tensor_parallel_region``), so FP8 back-ends can swap the GEMM module for
    their own (torchao's ``Float8Linear``, Transformer Engine's ``Linear``) without touching them."""

    def __init__(self, in_features: int, out_features: int, spec: ShardSpec, dtype: torch.dtype | None,
                 device: torch.device | str | None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        attach_spec(self.weight, spec)

    def reset_parameters(self) -> None:
        """Nothing: weights are initialised by global name (``model/init.py``), whatever the layout."""


class ColumnParallelLinear(_LocalLinear):
    """``y = x W^T`` with W split by output rows; the input is already in the TP region and the
    output stays split."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        local_out = _divide(out_features, tp.size, "out_features")
        super().__init__(in_features, local_out, ShardSpec((out_features, in_features), 0, tp.rank, tp.size),
                         dtype, device)


class RowParallelLinear(_LocalLinear):
    """``y = x W^T`` with W split by input columns; its output is this rank's partial sum, to be
    completed by ``exit_tensor_parallel_region``."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        local_in = _divide(in_features, tp.size, "in_features")
        super().__init__(local_in, out_features, ShardSpec((out_features, in_features), 1, tp.rank, tp.size),
                         dtype, device)


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
        return exit_tensor_parallel_region(out, self.tp)


class VocabParallelHead(_VocabSharded):
    """The LM head: a column-parallel linear over the padded vocabulary whose logits stay split."""

    def __init__(self, dim: int, vocab_size: int, tp: TensorParallel, pad_multiple: int = 128,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__(vocab_size, dim, tp, pad_multiple, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(enter_tensor_parallel_region(x, self.tp), self.weight)


__all__ = ["TensorParallel", "ShardSpec", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "VocabParallelHead", "enter_tensor_parallel_region", "exit_tensor_parallel_region", "padded_vocab_size"]
