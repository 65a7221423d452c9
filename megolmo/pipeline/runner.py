"""One rank's part of a pipelined step: its chunks as library stages, the chosen schedule, and the
loss of DESIGN.md computed on the stage that holds the head.

The loss a micro-batch backpropagates is its summed token cross-entropy (plus z-loss) divided by the
global batch's count of loss-bearing tokens, so the schedule must not rescale gradients
(``scale_grads=False``); label masks travel as the library's ``target``, split with the inputs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from megolmo.model.olmo2 import Olmo2ForCausalLM, shift_targets
from megolmo.parallel.state import ParallelState
from megolmo.pipeline.clock import SpanClock
from megolmo.pipeline.schedules import SINGLE_CHUNK, schedule_class, stage_indexes
from megolmo.pipeline.stage import ObservedStage, RankActivity, ScheduleRecord


def _meta(shape: tuple[int, ...], dtype: torch.dtype, requires_grad: bool = False) -> torch.Tensor:
    """What the library needs to size its receive buffers; ``requires_grad`` marks the activations
    whose gradients travel back."""
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=requires_grad)


class PipelineRunner:
    """``activation_shape`` is what travels between stages: (micro-batch, local sequence, hidden);
    ``count_gradient``/``gradient_count`` are the data-parallel synchronizer's, for weight passes."""

    def __init__(self, chunks: list[Olmo2ForCausalLM], ps: ParallelState, schedule: str, virtual: int,
                 num_micro_batches: int, seq_len: int, activation_shape: tuple[int, ...], dtype: torch.dtype,
                 count_gradient: Callable[[nn.Parameter], None], gradient_count: Callable[[nn.Parameter], int]):
        self.ps = ps
        indexes = stage_indexes(schedule, ps.pp_rank, ps.pp, virtual)
        num_stages = ps.pp * virtual
        self.holds_first = 0 in indexes
        self.holds_last = num_stages - 1 in indexes
        self.activity = RankActivity(SpanClock(ps.device))
        self.stages = []
        for local, (index, chunk) in enumerate(zip(indexes, chunks)):
            example_in = (_meta((activation_shape[0], seq_len), torch.long) if index == 0
                          else _meta(activation_shape, dtype, requires_grad=True))
            example_out = (_meta((activation_shape[0], seq_len, chunk.lm_head.weight.shape[0]), dtype)
                           if index == num_stages - 1 else _meta(activation_shape, dtype, requires_grad=True))
            self.stages.append(ObservedStage(chunk, index, num_stages, ps.device, example_in, example_out,
                                             ps.pp_group, self.activity, local, count_gradient, gradient_count))
        self.head = chunks[indexes.index(num_stages - 1)] if self.holds_last else None
        stages = self.stages[0] if schedule in SINGLE_CHUNK else self.stages
        self.schedule = schedule_class(schedule)(stages, num_micro_batches, loss_fn=self._loss, scale_grads=False)
        self._loss_tokens = 1
        self._z_loss = 0.0
        self._sums: list[torch.Tensor] = []
        self._row_sums: torch.Tensor | None = None  # set while evaluating
        self.last_record = ScheduleRecord()

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The micro-batch's share of the global mean (``target`` stacks the targets and the loss mask); in
        evaluation ``target`` also carries each row's index, and the rows' sums are kept by index."""
        if self._row_sums is not None:
            sums = self.head.row_cross_entropy_sums(logits, target[:, 0], target[:, 1].bool())
            self._row_sums[target[:, 2, 0]] = sums
            return sums.sum()
        ce_sum, z_sum = self.head.loss_sums_from_logits(logits, target[:, 0], target[:, 1].bool())
        self._sums.append(torch.stack([ce_sum.detach(), z_sum.detach()]))
        return (ce_sum + self._z_loss * z_sum) / max(self._loss_tokens, 1)

    def run(self, micro_batches: list[dict[str, torch.Tensor]], loss_tokens: int, z_loss: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's forwards and backwards; summed CE and logsumexp^2 (non-zero where the head is)."""
        self._loss_tokens, self._z_loss, self._sums = loss_tokens, z_loss, []
        args, target = self._inputs(micro_batches)
        self.activity.start_step()
        self.schedule.step(*args, target=target, return_outputs=False)
        self.last_record = self.activity.finish_step()
        return self._summed()

    def evaluate(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The same micro-batches forward only (the library's ``eval``): each row's summed cross-entropy,
        in micro-batch order, where the head is (zeros on the other stages)."""
        rows = sum(len(b["input_ids"]) for b in micro_batches)
        self._row_sums = torch.zeros(rows, device=self.ps.device)
        args, target = self._inputs(micro_batches, with_rows=True)
        self.activity.start_step()
        try:
            self.schedule.eval(*args, target=target)
        finally:
            self.activity.finish_step()  # the timeline keeps the last training step's record
            row_sums, self._row_sums = self._row_sums, None
        return row_sums

    def _inputs(self, micro_batches: list[dict[str, torch.Tensor]], with_rows: bool = False
                ) -> tuple[tuple, torch.Tensor | None]:
        """Token ids for the first stage; targets stacked with the loss mask (and row indexes) for the last."""
        device = self.ps.device
        args = ()
        if self.holds_first:  # each micro-batch copied from the prefetcher's pinned memory, then joined
            args = (torch.cat([b["input_ids"].to(device, non_blocking=True) for b in micro_batches]),)
        target = None
        if self.holds_last:
            pairs = [shift_targets(b["input_ids"].to(device, non_blocking=True),
                                   b["label_mask"].to(device, non_blocking=True)) for b in micro_batches]
            target = torch.cat([torch.stack([t, m.long()], dim=1) for t, m in pairs])
            if with_rows:
                rows = torch.arange(len(target), device=device).unsqueeze(-1).expand(-1, target.shape[-1])
                target = torch.cat([target, rows.unsqueeze(1)], dim=1)
        return args, target

    def _summed(self) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.stack(self._sums).sum(0) if self._sums else torch.zeros(2, device=self.ps.device)
        self._sums = []
        return total[0], total[1]
