"""Checkpoints every ``trainer.save_interval`` steps, at the end of the job (``stop_at`` or ``max_steps``)
and when the job stops early (``trainer.stop_request``), through the trainer's ``save`` (which calls the
save hooks). With ``trainer.async_save`` the interval's saves are asynchronous; the job's last save and a
save before stopping are synchronous, since the process leaves right after them."""
from __future__ import annotations

from megolmo.callbacks.base import Callback, StepRecord


class Checkpointing(Callback):
    def __init__(self, save_interval: int, asynchronous: bool = False):
        self.save_interval = save_interval
        self.asynchronous = asynchronous
        self.blocked_s: list[float] = []  # each save's wait, as this rank saw it

    def on_step_end(self, trainer, record: StepRecord) -> None:
        leaving = record.step == trainer.last_step or trainer.stop_request is not None
        if record.step % self.save_interval == 0 or leaving:
            trainer.save(record.step, asynchronous=self.asynchronous and not leaving)
            self.blocked_s.append(trainer.last_save.blocked_s)

    def summary(self, trainer) -> dict:
        blocked = self.blocked_s
        return {"checkpoints": {"saves": len(blocked), "asynchronous": self.asynchronous,
                                "blocked_s_total": sum(blocked), "blocked_s_max": max(blocked, default=0.0)}}
