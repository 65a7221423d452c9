"""Runs one pipeline rank's schedule: forwards and backwards of its model chunks over micro-batches,
exchanging activations and gradients with the neighbouring ranks.

A stage's output is sent, then its storage is dropped (the autograd graph keeps what backward needs);
backward is started from the dropped output with the received gradient, as Megatron does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.autograd.variable import Variable

from megolmo.model.olmo2 import Olmo2ForCausalLM
from megolmo.parallel.state import ParallelState
from megolmo.pipeline.p2p import ACTIVATION, GRADIENT, PointToPoint
from megolmo.pipeline.schedules import pipeline_order
from megolmo.step import micro_batch_loss


@dataclass
class ScheduleRecord:
    """What one step did on this rank: the op order, timed spans, and the peak of live activation sets."""

    ops: list[tuple[str, int, int]] = field(default_factory=list)
    spans: list[tuple[str, float, float]] = field(default_factory=list)
    max_alive: int = 0
    started: float = 0.0


def _backward_from(output: torch.Tensor, grad: torch.Tensor) -> None:
    """Backward from an output whose storage was already released (shape checks would fail)."""
    Variable._execution_engine.run_backward((output,), (grad,), False, False, (), True, True)


class PipelineEngine:
    def __init__(self, chunks: list[Olmo2ForCausalLM], ps: ParallelState, virtual: int, num_micro_batches: int,
                 activation_shape: tuple[int, ...], dtype: torch.dtype):
        self.chunks = chunks
        self.ps = ps
        self.virtual = virtual
        self.num_micro_batches = num_micro_batches
        self.activation_shape = activation_shape
        self.dtype = dtype
        self.num_chunks = ps.pp * virtual
        stride = ps.dp * ps.tp
        next_rank = ps.rank + ((ps.pp_rank + 1) % ps.pp - ps.pp_rank) * stride
        prev_rank = ps.rank + ((ps.pp_rank - 1) % ps.pp - ps.pp_rank) * stride
        self.p2p = PointToPoint(prev_rank, next_rank, self.num_chunks, num_micro_batches)
        self.order = pipeline_order(ps.pp, ps.pp_rank, num_micro_batches, virtual)
        self.last_record = ScheduleRecord()

    def run(self, micro_batches: list[dict[str, torch.Tensor]], loss_tokens: int, z_loss: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's forwards and backwards; returns summed CE and logsumexp^2 (non-zero on the last stage)."""
        device = self.ps.device
        record = ScheduleRecord(started=time.perf_counter())
        ce_total = torch.zeros((), device=device)
        z_total = torch.zeros((), device=device)
        stash: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for kind, micro_batch, chunk in self.order:
            self.p2p.release_completed()
            record.ops.append((kind, micro_batch, chunk))
            g = chunk * self.ps.pp + self.ps.pp_rank
            if kind == "F":
                inputs = self._forward_input(micro_batches[micro_batch], g, micro_batch, record)
                t0 = time.perf_counter()
                if g == self.num_chunks - 1:
                    output, ce, z = micro_batch_loss(self.chunks[chunk], inputs, micro_batches[micro_batch],
                                                     loss_tokens, z_loss, device)
                    ce_total += ce
                    z_total += z
                    record.spans.append((f"F{micro_batch}.{chunk}", t0, time.perf_counter()))
                else:
                    output = self.chunks[chunk](inputs)
                    record.spans.append((f"F{micro_batch}.{chunk}", t0, time.perf_counter()))
                    t0 = time.perf_counter()
                    self.p2p.send(output, ACTIVATION, g + 1, micro_batch)
                    output.data = torch.empty(1, dtype=output.dtype, device=device)
                    record.spans.append((f"send{micro_batch}.{chunk}", t0, time.perf_counter()))
                stash[(micro_batch, chunk)] = (inputs, output)
                record.max_alive = max(record.max_alive, len(stash))
            else:
                inputs, output = stash.pop((micro_batch, chunk))
                if g == self.num_chunks - 1:
                    t0 = time.perf_counter()
                    output.backward()
                else:
                    t0 = time.perf_counter()
                    grad = self.p2p.recv(self.activation_shape, self.dtype, device, GRADIENT, g, micro_batch)
                    record.spans.append((f"recv{micro_batch}.{chunk}", t0, time.perf_counter()))
                    t0 = time.perf_counter()
                    _backward_from(output, grad)
                record.spans.append((f"B{micro_batch}.{chunk}", t0, time.perf_counter()))
                if g > 0:
                    t0 = time.perf_counter()
                    self.p2p.send(inputs.grad, GRADIENT, g - 1, micro_batch)
                    record.spans.append((f"send{micro_batch}.{chunk}", t0, time.perf_counter()))
        self.p2p.wait_all()
        self.last_record = record
        return ce_total, z_total

    def _forward_input(self, batch: dict[str, torch.Tensor], g: int, micro_batch: int,
                       record: ScheduleRecord) -> torch.Tensor:
        if g == 0:
            return batch["input_ids"].to(self.ps.device)
        t0 = time.perf_counter()
        received = self.p2p.recv(self.activation_shape, self.dtype, self.ps.device, ACTIVATION, g, micro_batch)
        record.spans.append((f"recv{micro_batch}.{g // self.ps.pp}", t0, time.perf_counter()))
        return received.requires_grad_()
