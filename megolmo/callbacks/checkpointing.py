"""Checkpoints every ``trainer.save_interval`` steps, at the end of the job (``stop_at`` or ``max_steps``)
and when the job stops early (``trainer.stop_request``), through the trainer's ``save`` (which calls the
save hooks)."""
from __future__ import annotations

from megolmo.callbacks.base import Callback, StepRecord


class Checkpointing(Callback):
    def __init__(self, save_interval: int):
        self.save_interval = save_interval

    def on_step_end(self, trainer, record: StepRecord) -> None:
        if record.step % self.save_interval == 0 or record.step == trainer.last_step or trainer.stop_request:
            trainer.save(record.step)
