"""Deterministic global batches: step s is dataset instances [s*G, (s+1)*G) on every parallel layout.

Because a batch is a function of the step alone, resuming is just asking for the step, and changing the
data-parallel size or micro-batch size changes only who computes which rows, never what the step sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from megolmo.data.dataset import TokenDataset
from megolmo.data.instance_filter import RepetitionFilter
from megolmo.data.sources import DataSources, resolve_sources
from megolmo.errors import MegolmoConfigError


@dataclass
class StepBatch:
    """One DP rank's share of a step: its micro-batches, its share of the step's loss denominator (label
    positions 1..seq_len-1 whose mask is set, plus seq_len per filtered-out instance; summed over DP ranks)
    and its filtered-out instances."""

    step: int
    micro_batches: list[dict[str, torch.Tensor]]
    loss_tokens: int
    masked_instances: int

    def pinned(self) -> StepBatch:
        """In page-locked memory, so the copy to the GPU can run asynchronously."""
        pinned = [{key: t.pin_memory() for key, t in batch.items()} for batch in self.micro_batches]
        return StepBatch(self.step, pinned, self.loss_tokens, self.masked_instances)


class GlobalBatchLoader:
    """This DP rank's contiguous slice of each global batch, cut into micro-batches."""

    def __init__(
        self,
        dataset: TokenDataset,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        limit: int | None = None,
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
        self.limit = limit  # rows from this index on are padding that carries no loss (a last partial batch)

    def _padding(self) -> dict[str, torch.Tensor]:
        seq_len = self.dataset.seq_len
        return {"input_ids": torch.zeros(seq_len, dtype=torch.long), "label_mask": torch.zeros(seq_len, dtype=torch.bool),
                "instance_mask": torch.tensor(True)}

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        return self.read_step(step).micro_batches

    def read_step(self, step: int) -> StepBatch:
        """This rank's micro-batches of `step` (input_ids LongTensor, label_mask BoolTensor, [mbs, seq_len]) and
        what its rows contribute to the step's loss denominator."""
        per_rank = self.global_batch_size // self.dp_size
        first = step * self.global_batch_size + self.dp_rank * per_rank
        rows = [self.dataset[i] if self.limit is None or i < self.limit else self._padding()
                for i in range(first, first + per_rank)]
        micro_batches = []
        for m in range(0, per_rank, self.micro_batch_size):
            chunk = rows[m : m + self.micro_batch_size]
            micro_batches.append({key: torch.stack([row[key] for row in chunk]) for key in ("input_ids", "label_mask")})
        masked = sum(not bool(row["instance_mask"]) for row in rows)
        # OLMo-core's convention: a filtered instance's labels are ignored, yet it adds seq_len to the denominator
        loss_tokens = sum(int(b["label_mask"][:, 1:].sum()) for b in micro_batches) + masked * self.dataset.seq_len
        return StepBatch(step, micro_batches, loss_tokens, masked)


def build_loader(
    data_cfg: Mapping[str, Any],
    trainer_cfg: Mapping[str, Any],
    vocab_size: int,
    dp_rank: int,
    dp_size: int,
    eos_token_id: int | None = None,
    sources: DataSources | None = None,
) -> GlobalBatchLoader:
    """The loader for the `data.*` and `trainer.*` config groups (OmegaConf or plain dicts); ``sources``, when
    the caller has resolved them already."""
    for key in ("seq_len", "seed"):
        if data_cfg.get(key) is None:
            raise MegolmoConfigError(f"data.{key} is missing")
    for key in ("global_batch_size", "micro_batch_size"):
        if trainer_cfg.get(key) is None:
            raise MegolmoConfigError(f"trainer.{key} is missing")
    sources = sources or resolve_sources(data_cfg)
    dataset = TokenDataset(
        paths=sources.paths,
        seq_len=data_cfg["seq_len"],
        dtype=sources.dtype,
        vocab_size=vocab_size,
        seed=data_cfg["seed"],
        label_mask_paths=sources.label_mask_paths,
        weights=sources.weights,
        eos_token_id=eos_token_id,
        instance_filter=_instance_filter(data_cfg.get("instance_filter")),
    )
    return GlobalBatchLoader(
        dataset,
        global_batch_size=trainer_cfg["global_batch_size"],
        micro_batch_size=trainer_cfg["micro_batch_size"],
        dp_rank=dp_rank,
        dp_size=dp_size,
    )


def _instance_filter(cfg: Mapping[str, Any] | None) -> RepetitionFilter | None:
    if not cfg or not cfg.get("enabled"):
        return None
    return RepetitionFilter(int(cfg["min_period"]), int(cfg["max_period"]), int(cfg["max_count"]))
