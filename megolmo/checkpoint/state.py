"""The checkpointable state of a run as global tensors: fp32 weights and the Adam moments.

Keys: ``model/<name>`` (fp32 master weights under transformers' parameter names), and
``optim/exp_avg/<name>``, ``optim/exp_avg_sq/<name>``. They are read from and written into the
optimizer's shards directly, whatever the TP x PP x DP layout and whether the optimizer is sharded.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from megolmo.checkpoint.shards import GlobalPieces, Piece, flat_range_pieces
from megolmo.optim.adamw import DistributedAdamW

MODEL, EXP_AVG, EXP_AVG_SQ = "model/", "optim/exp_avg/", "optim/exp_avg_sq/"


def optimizer_flats(optimizer: DistributedAdamW, with_optimizer: bool = True) -> dict[str, list[torch.Tensor]]:
    """The flat shards a checkpoint holds, by key prefix: fp32 masters, and the moments ``with_optimizer``."""
    flats = {MODEL: optimizer.master}
    if with_optimizer:
        flats.update({EXP_AVG: optimizer.exp_avg, EXP_AVG_SQ: optimizer.exp_avg_sq})
    return flats


def checkpoint_tensors(optimizer: DistributedAdamW, with_optimizer: bool = True,
                       flats: dict[str, list[torch.Tensor]] | None = None) -> dict[str, GlobalPieces]:
    """This rank's pieces of every global tensor, as views of the optimizer's storage (no copies), or of
    ``flats``: copies of ``optimizer_flats`` (an asynchronous save's staged state)."""
    slots = {slot.name: slot for slot in optimizer.buffers.slots}
    pieces: dict[str, list[Piece]] = defaultdict(list)
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, shards in (flats or optimizer_flats(optimizer, with_optimizer)).items():
        for flat, segments in zip(shards, optimizer.segments):
            for seg in segments:
                slot = slots[seg.name]
                spec = slot.param.shard_spec
                found = flat_range_pieces(flat[seg.start:seg.end], seg.param_offset,
                                          seg.param_offset + seg.end - seg.start, tuple(slot.param.shape), spec)
                if found:
                    pieces[prefix + seg.name].extend(found)
                    shapes[prefix + seg.name] = tuple(spec.global_shape)
    return {key: GlobalPieces(found, shapes[key]) for key, found in pieces.items()}


def expected_shapes(optimizer: DistributedAdamW) -> dict[str, tuple[int, ...]]:
    """Global shape of every model tensor this rank holds, in model order (for the architecture check)."""
    return {MODEL + slot.name: tuple(slot.param.shard_spec.global_shape) for slot in reversed(optimizer.buffers.slots)}


@torch.no_grad()
def reset_moments(optimizer: DistributedAdamW) -> None:
    for tensor in optimizer.exp_avg + optimizer.exp_avg_sq:
        tensor.zero_()
    optimizer.step_count = 0
