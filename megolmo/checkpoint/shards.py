"""This rank's pieces of global tensors, in the form torch.distributed.checkpoint saves and loads.

A checkpoint stores every tensor under its global name with its global shape; each rank contributes
rectangular pieces with their global offsets. Pieces come from the optimizer's flat shards: a flat
range of a row-major ``[R, C]`` tensor is at most three rectangles (a partial first row, a block of
whole rows, a partial last row), so even the distributed optimizer's shards, which cut parameters at
arbitrary elements, save without gathering anything. Vocabulary padding rows are never saved.
Identical pieces held by several ranks (data-parallel replicas, TP-replicated norms) are written once:
the checkpoint planner deduplicates them by name and offset.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from megolmo.parallel.layers import ShardSpec


@dataclass(frozen=True)
class Piece:
    offsets: tuple[int, ...]  # global offsets
    tensor: torch.Tensor      # a view into this rank's storage, shaped like the rectangle


class GlobalPieces(torch.Tensor):
    """A stand-in tensor that DCP treats as the local pieces of a global tensor.

    It implements the hooks DCP uses for DTensor (``__create_write_items__``, ``__create_chunk_list__``,
    ``__get_tensor_shard__``), since DTensor cannot express uneven, padded or flat-range sharding.
    ``size`` is hidden so DCP's plain-tensor size check does not compare a piece with the global shape.
    """

    size = None  # type: ignore[assignment]

    @staticmethod
    def __new__(cls, pieces: list[Piece], global_shape: tuple[int, ...]):
        obj = torch.Tensor._make_subclass(cls, torch.empty(0, dtype=pieces[0].tensor.dtype), False)
        obj.pieces = pieces
        obj.global_shape = torch.Size(global_shape)
        return obj

    def __create_write_items__(self, fqn: str, _obj) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(p.offsets)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size(p.offsets), sizes=p.tensor.shape),
                              properties=TensorProperties.create_from_tensor(p.tensor), size=self.global_shape))
                for p in self.pieces]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(p.offsets), sizes=p.tensor.shape) for p in self.pieces]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for piece in self.pieces:
            if torch.Size(piece.offsets) == index.offset:
                return piece.tensor
        raise ValueError(f"{index.fqn}: no local piece at offset {tuple(index.offset)}")


def local_origin(spec: ShardSpec, local_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Global offsets of element (0, ..., 0) of a rank's local parameter."""
    origin = [0] * len(local_shape)
    if spec.dim is not None:
        origin[spec.dim] = spec.rank * local_shape[spec.dim]
    return tuple(origin)


def flat_range_pieces(flat: torch.Tensor, start: int, end: int, local_shape: tuple[int, ...],
                      spec: ShardSpec) -> list[Piece]:
    """Rectangles covering elements [start, end) of a local parameter stored flat in ``flat``
    (``flat[0]`` is element ``start``), in global coordinates, padding rows dropped."""
    origin = local_origin(spec, local_shape)
    rows_in_global = spec.global_shape[0]
    if len(local_shape) == 1:
        lo, hi = origin[0] + start, min(origin[0] + end, rows_in_global)
        return [Piece((lo,), flat[: hi - lo])] if hi > lo else []
    cols = local_shape[1]
    pieces, position = [], start
    while position < end:
        row, col = divmod(position, cols)
        if col or end - position < cols:  # a partial row
            length = min(cols - col, end - position)
            shape, count = (1, length), length
        else:  # whole rows
            nrows = (end - position) // cols
            shape, count = (nrows, cols), nrows * cols
        global_row = origin[0] + row
        keep_rows = min(shape[0], rows_in_global - global_row)
        if keep_rows > 0:
            view = flat[position - start: position - start + keep_rows * shape[1]].view(keep_rows, shape[1])
            pieces.append(Piece((global_row, origin[1] + col), view))
        position += count
    return pieces
