"""The per-rank training step: one factory builds it for the trainer, the benchmarks and the tests."""
from megolmo.step.chunks import ChunkSettings, build_chunks
from megolmo.step.loss import forward_backward, micro_batch_loss
from megolmo.step.train_step import StepResult, StepSettings, TrainStep, build_train_step

__all__ = ["ChunkSettings", "StepResult", "StepSettings", "TrainStep", "build_chunks", "build_train_step",
           "forward_backward", "micro_batch_loss"]
