"""TensorBoard logging (``logging.tensorboard=true``): each step's numbers, the same values
``metrics.jsonl`` holds (that file stays the source of truth), as scalars ``train/<field>`` (evaluations under their own ``eval/...`` names) in event
files under ``<run_dir>/tensorboard``.

A resumed job appends a new event file to the same directory; steps after the checkpoint it resumes
from, which the job recomputes, are purged (``purge_step``) so TensorBoard shows each step once. Only
global rank 0 writes. ``torch.utils.tensorboard`` is imported when the run starts, so megolmo imports
without the ``tensorboard`` package.
"""
from __future__ import annotations

from megolmo.callbacks.base import Callback, StepRecord
from megolmo.callbacks.wandb_log import require

LOG_DIR = "tensorboard"


class TensorBoardLog(Callback):
    def __init__(self):
        require("tensorboard", "logging.tensorboard=true", "tensorboard")
        self.writer = None

    def on_start(self, trainer) -> None:
        if not trainer.run_dir.is_writer:
            return
        from torch.utils.tensorboard import SummaryWriter

        first_step = trainer.start_step + 1
        self.writer = SummaryWriter(log_dir=str(trainer.run_dir.path / LOG_DIR),
                                    purge_step=first_step if first_step > 1 else None)

    def on_step_end(self, trainer, record: StepRecord) -> None:
        if self.writer is not None:
            values = record.numbers()
            step = values.pop("step")
            for key, value in values.items():  # eval/<set>/CE keeps its name; the step's own fields are train/
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, global_step=step)

    def on_end(self, trainer) -> None:
        self.close()

    def on_failure(self, trainer, error: BaseException) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()  # flushes
