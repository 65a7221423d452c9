"""Deterministic global batches: step s is dataset instances [s*G, (s+1)*G) on every parallel layout.

Because a batch is a function of the step alone, resuming is just asking for the step, and changing the
data-parallel size or micro-batch size changes only who computes which rows, never what the step sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from megolmo.data.dataset import TokenDataset
from megolmo.errors import MegolmoConfigError


class GlobalBatchLoader:
    """This DP rank's contiguous slice of each global batch, cut into micro-batches."""

    def __init__(
        self,
        dataset: TokenDataset,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        if not isinstance(global_batch_size, int) or global_batch_size < 1:
            raise MegolmoConfigError(f"trainer.global_batch_size={global_batch_size!r}: expected a positive integer")
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise MegolmoConfigError(f"trainer.micro_batch_size={micro_batch_size!r}: expected a positive integer")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in range for dp_size={dp_size}")
        if global_batch_size % dp_size:
            raise MegolmoConfigError(
                f"trainer.global_batch_size={global_batch_size} is not divisible by the data-parallel size {dp_size}"
            )
        per_rank = global_batch_size // dp_size
        if per_rank % micro_batch_size:
            raise MegolmoConfigError(
                f"trainer.micro_batch_size={micro_batch_size} does not divide the {per_rank} sequences per "
                f"data-parallel rank (trainer.global_batch_size={global_batch_size} / data-parallel size {dp_size})"
            )
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_micro_batches = per_rank // micro_batch_size

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of `step`: input_ids (LongTensor) and label_mask (BoolTensor), [mbs, seq_len]."""
        per_rank = self.global_batch_size // self.dp_size
        first = step * self.global_batch_size + self.dp_rank * per_rank
        batches = []
        for m in range(self.num_micro_batches):
            start = first + m * self.micro_batch_size
            rows = [self.dataset[i] for i in range(start, start + self.micro_batch_size)]
            batches.append({key: torch.stack([row[key] for row in rows]) for key in ("input_ids", "label_mask")})
        return batches

    def global_loss_tokens(self, step: int) -> int:
        """Loss-bearing tokens of the whole global batch, read from mask bytes so no rank needs a collective."""
        first = step * self.global_batch_size
        return sum(self.dataset.loss_tokens(i) for i in range(first, first + self.global_batch_size))


def build_loader(
    data_cfg: Mapping[str, Any],
    trainer_cfg: Mapping[str, Any],
    vocab_size: int,
    dp_rank: int,
    dp_size: int,
) -> GlobalBatchLoader:
    """The loader for the `data.*` and `trainer.*` config groups (OmegaConf or plain dicts)."""
    paths = _as_list(data_cfg.get("paths"))
    if not paths:
        raise MegolmoConfigError("data.paths is missing or empty: give at least one token file")
    for key in ("seq_len", "dtype", "seed"):
        if data_cfg.get(key) is None:
            raise MegolmoConfigError(f"data.{key} is missing")
    for key in ("global_batch_size", "micro_batch_size"):
        if trainer_cfg.get(key) is None:
            raise MegolmoConfigError(f"trainer.{key} is missing")
    dataset = TokenDataset(
        paths=[str(p) for p in paths],
        seq_len=data_cfg["seq_len"],
        dtype=str(data_cfg["dtype"]),
        vocab_size=vocab_size,
        seed=data_cfg["seed"],
        label_mask_paths=[str(p) for p in _as_list(data_cfg.get("label_mask_paths"))] or None,
        weights=_as_list(data_cfg.get("weights")) or None,
    )
    return GlobalBatchLoader(
        dataset,
        global_batch_size=trainer_cfg["global_batch_size"],
        micro_batch_size=trainer_cfg["micro_batch_size"],
        dp_rank=dp_rank,
        dp_size=dp_size,
    )


def _as_list(value: Any) -> list:
    """Config lists arrive as ListConfig, list, a lone string, or None."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)
