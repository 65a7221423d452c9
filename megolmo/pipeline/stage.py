"""One model chunk as a stage of ``torch.distributed.pipelining``, observed as the schedule runs it.

The library runs the schedule and its point-to-point traffic; this subclass adds what megolmo needs
around each computation: spans for the timeline and the measured bubble (device-timed, see
``SpanClock``), the number of micro-batches whose activations are alive on this rank, and gradient
counting for the data-parallel buckets when the library accumulates weight gradients itself (the
zero-bubble weight pass adds into ``.grad`` without firing autograd's accumulate hooks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage

from megolmo.pipeline.clock import SpanClock
from megolmo.parallel.state import Group


@dataclass
class ScheduleRecord:
    """What one step did on this rank: timed compute spans ``("F3.1", t0, t1)`` in seconds since the
    step's start, and the peak number of micro-batches whose activations were held at once."""

    spans: list[tuple[str, float, float]] = field(default_factory=list)
    max_alive: int = 0


class RankActivity:
    """Shared by a rank's stages: activations alive across all of them, and the clock for spans."""

    def __init__(self, clock: SpanClock):
        self.clock = clock
        self.alive = 0
        self.record = ScheduleRecord()

    def start_step(self) -> None:
        self.alive = 0
        self.record = ScheduleRecord()
        self.clock.start()

    def finish_step(self) -> ScheduleRecord:
        self.record.spans = self.clock.resolve()
        return self.record

    def hold(self, delta: int) -> None:
        self.alive += delta
        self.record.max_alive = max(self.record.max_alive, self.alive)


class ObservedStage(PipelineStage):
    """A ``PipelineStage`` whose forward (F), backward (B, or input-only backward I) and weight
    backward (W) are timed and counted. ``count_gradient`` is called for every parameter whose
    gradient the library accumulated without autograd's hooks."""

    def __init__(self, chunk: nn.Module, stage_index: int, num_stages: int, device: torch.device,
                 example_input: torch.Tensor, example_output: torch.Tensor, group: Group,
                 activity: RankActivity, virtual_index: int,
                 count_gradient: Callable[[nn.Parameter], None], gradient_count: Callable[[nn.Parameter], int]):
        super().__init__(chunk, stage_index, num_stages, device, input_args=example_input,
                         output_args=example_output, group=group)
        self.activity = activity
        self.virtual_index = virtual_index
        self._count_gradient = count_gradient
        self._gradient_count = gradient_count
        self._params = [p for p in reversed(list(chunk.parameters())) if p.requires_grad]

    def _span(self, kind: str, micro_batch: int):
        return self.activity.clock.span(f"{kind}{micro_batch}.{self.virtual_index}")

    def forward_one_chunk(self, fwd_chunk_id, args, kwargs=None, save_forward_output=True):
        with self._span("F", fwd_chunk_id):
            output = super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)
        self.activity.hold(+1)
        return output

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        with self._span("B" if full_backward else "I", bwd_chunk_id):
            super().backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward)
        if full_backward:
            self.activity.hold(-1)

    def get_local_bwd_output(self, mb_index):
        """torch's runtime schedules run their backward actions in ``eval`` too, where they are no-ops,
        except the hand-over between a V's two chunks on one rank (zbv), which asserts: none to hand over."""
        return super().get_local_bwd_output(mb_index) if self.has_backward else None

    def set_local_bwd_input(self, next_stage_bwd_outputs, mb_index):
        if self.has_backward:
            super().set_local_bwd_input(next_stage_bwd_outputs, mb_index)

    def backward_weight_one_chunk(self, bwd_chunk_id, last_backward=False):
        before = [self._gradient_count(p) for p in self._params]
        with self._span("W", bwd_chunk_id):
            super().backward_weight_one_chunk(bwd_chunk_id, last_backward)
        for param, count in zip(self._params, before):
            if self._gradient_count(param) == count:  # accumulated by the library, not through autograd
                self._count_gradient(param)
        self.activity.hold(-1)
