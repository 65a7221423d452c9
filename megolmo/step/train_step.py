"""``TrainStep``: everything one optimizer step does on a rank, built in one place.

The step owns this rank's chunks, the flat parameter/gradient buffers with their data-parallel
bucket reductions, the schedule (plain micro-batch loop, or a pipeline schedule), and the optimizer.
``build_train_step`` assembles it; the trainer, the benchmarks and the tests all call it, so what is
measured and tested is what trains.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from megolmo.kernels.fused_adam import UPDATES
from megolmo.model.olmo2 import Olmo2ForCausalLM
from megolmo.optim.adamw import AdamWSettings, DistributedAdamW
from megolmo.optim.buffers import FlatBuffers
from megolmo.optim.grad_sync import GradientSynchronizer
from megolmo.optim.nonfinite import first_nonfinite_gradient
from megolmo.optim.skip_step import SkipStepGuard, SkipStepSettings
from megolmo.parallel.collectives import all_gather, all_gather_objects, all_reduce_values, world_group
from megolmo.parallel.mappings import all_reduce_sum
from megolmo.parallel.state import ParallelState
from megolmo.step.chunks import ChunkSettings, build_chunks
from megolmo.step.loss import forward_backward, forward_only

if TYPE_CHECKING:
    from megolmo.pipeline.runner import PipelineRunner


@dataclass(frozen=True)
class StepSettings:
    adamw: AdamWSettings
    num_micro_batches: int = 1     # per rank and step
    micro_batch_size: int = 1      # sequences
    seq_len: int = 0               # tokens per sequence (needed with a pipeline)
    z_loss: float = 0.0
    bucket_size: int = 40_000_000  # elements per data-parallel gradient bucket
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = True
    schedule: str = "1f1b"         # pipeline schedule (with parallel.pipeline > 1)
    virtual: int = 1               # chunks per pipeline rank
    fused_optimizer: str | None = None  # a KernelChoice.optimizer name
    skip_step: SkipStepSettings | None = None  # OLMo 2 32B's guard against outlier steps


@dataclass
class StepResult:
    ce_sum: float      # summed token cross-entropy over the global batch
    z_sum: float       # summed logsumexp^2 over the global batch
    grad_norm: float   # this rank's: a NaN in one rank's gradients reaches only some ranks' norms
    skipped: bool = False    # the skip-step guard withheld this step's update
    nonfinite: bool = False  # some rank's loss or grad norm was NaN or infinite: no rank applied the update

    @property
    def applied(self) -> bool:
        return not (self.skipped or self.nonfinite)


class TrainStep:
    def __init__(self, chunks: list[Olmo2ForCausalLM], ps: ParallelState, settings: StepSettings):
        self.chunks = chunks
        self.ps = ps
        self.settings = settings
        named = [(name, param) for chunk in chunks for name, param in chunk.named_parameters()]
        self.buffers = FlatBuffers(named, ps.dp, int(settings.bucket_size))
        self.grad_sync = GradientSynchronizer(self.buffers, ps.dp_group, settings.num_micro_batches,
                                              reduce_scatter=settings.distributed_optimizer,
                                              overlap=settings.overlap_grad_reduce)
        self.sequence_parallel_grads = [slot.param.main_grad for slot in self.buffers.slots
                                        if getattr(slot.param, "sequence_parallel", False)]
        self.optimizer = DistributedAdamW(self.buffers, settings.adamw, ps.dp_group, settings.distributed_optimizer,
                                          ps.tp_rank, [g for g in (ps.tp_group, ps.pp_group) if g is not None],
                                          UPDATES.get(settings.fused_optimizer))
        self.skip_guard = SkipStepGuard(settings.skip_step) if settings.skip_step is not None else None
        self.pipeline: PipelineRunner | None = None
        if ps.pp > 1:
            from megolmo.pipeline.runner import PipelineRunner  # torch.distributed.pipelining: pipelined jobs only

            sp = chunks[0].tp.sequence_parallel
            shape = (settings.micro_batch_size, settings.seq_len // (ps.tp if sp else 1), chunks[0].cfg.hidden_size)
            dtype = next(chunks[0].parameters()).dtype
            self.pipeline = PipelineRunner(chunks, ps, settings.schedule, settings.virtual, settings.num_micro_batches,
                                           settings.seq_len, shape, dtype, self.grad_sync.count_gradient,
                                           self.grad_sync.gradient_count)

    @property
    def model(self) -> nn.ModuleList:
        return nn.ModuleList(self.chunks)

    def run(self, micro_batches: list[dict[str, torch.Tensor]], loss_tokens: int, lr: float) -> StepResult:
        """Forwards and backwards over this rank's micro-batches, gradient reductions, one AdamW update.
        ``loss_tokens`` is the global batch's count of loss-bearing tokens (DESIGN.md's loss convention)."""
        self.grad_sync.start_step()
        if self.pipeline is None:
            ce, z = forward_backward(self.chunks[0], micro_batches, loss_tokens, self.settings.z_loss, self.ps.device)
        else:
            ce, z = self.pipeline.run(micro_batches, loss_tokens, self.settings.z_loss)
        self.grad_sync.finish()
        for grad in self.sequence_parallel_grads:  # weights that saw only a sequence shard: sum over TP
            all_reduce_sum(grad, self.ps.tp_group)
        sums = all_reduce_sum(all_reduce_sum(torch.stack([ce, z]), self.ps.dp_group), self.ps.pp_group)
        norm = self.optimizer.grad_norm()
        nonfinite, skipped = self.withheld(float(sums[0]) / max(loss_tokens, 1), float(norm))
        if nonfinite or skipped:
            return StepResult(float(sums[0]), float(sums[1]), float(norm), skipped, nonfinite)
        grad_norm = self.optimizer.step(lr, norm)
        return StepResult(float(sums[0]), float(sums[1]), grad_norm)

    def withheld(self, loss: float, grad_norm: float) -> tuple[bool, bool]:
        """Whether no rank applies this step because some rank's loss or norm is non-finite, and whether the
        skip-step guard withholds it: agreed by every rank in one tiny all-reduce (a NaN in one rank's gradients
        reaches only its tensor-parallel group's norm; a skip anywhere is a skip everywhere). A non-finite step
        joins the guard's history on no rank, so the ranks' histories stay equal."""
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        outlier = finite and self.skip_guard is not None and not self.skip_guard.allows(loss, grad_norm)
        nonfinite, skipped = all_reduce_values([float(not finite), float(outlier)], "max", world_group())
        if self.skip_guard is not None and not nonfinite:
            self.skip_guard.record(loss, grad_norm)
        return bool(nonfinite), bool(skipped and not nonfinite)

    def nonfinite_gradients(self) -> list[str | None]:
        """Collective over all ranks, after a non-finite step: each global rank's first non-finite gradient."""
        return all_gather_objects(first_nonfinite_gradient(self.optimizer), world_group())

    def evaluate(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Forward only over this rank's micro-batches of a batch shaped like a training step's: each row's
        summed cross-entropy over its label tokens, for the whole global batch in row order, on every rank
        (fp64, host). Weights, gradients and optimizer untouched."""
        if self.pipeline is None:
            rows = forward_only(self.chunks[0], micro_batches, self.ps.device)
        else:
            with torch.no_grad():
                rows = all_reduce_sum(self.pipeline.evaluate(micro_batches), self.ps.pp_group)
        if self.ps.dp > 1:  # every data-parallel rank holds an equal, contiguous slice of the rows
            slices = [torch.empty_like(rows) for _ in range(self.ps.dp)]
            all_gather(slices, rows, self.ps.dp_group)
            rows = torch.cat(slices)
        return rows.double().cpu()


def build_train_step(ps: ParallelState, settings: StepSettings, chunk_settings: ChunkSettings | None = None,
                     chunks: list[Olmo2ForCausalLM] | None = None) -> TrainStep:
    """The step of this rank: its chunks are built from ``chunk_settings`` (with the kernels chosen), or
    given ready-made (``chunks``: tests and benchmarks with their own modules)."""
    if (chunk_settings is None) == (chunks is None):
        raise ValueError("give exactly one of chunk_settings and chunks")
    if chunks is None:
        torch.manual_seed(chunk_settings.seed)
        chunks = build_chunks(chunk_settings, ps, settings.schedule, settings.virtual)
    return TrainStep(chunks, ps, settings)
