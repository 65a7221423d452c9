"""In-loop evaluation: held-out perplexity every ``eval.interval`` steps and after the job's last step.

Its metrics join the step's record (``eval/<set>/CE``, ``eval/<set>/PPL``), so ``metrics.jsonl`` and every
logger see them on the step they describe; it must therefore come before those callbacks.
"""
from __future__ import annotations

import time

from megolmo.callbacks.base import Callback, StepRecord
from megolmo.evaluation.lm import HeldOutSet, evaluate_set


class LmEvaluation(Callback):
    def __init__(self, held_out: list[HeldOutSet], interval: int | None):
        self.held_out = held_out
        self.interval = interval

    def on_step_end(self, trainer, record: StepRecord) -> None:
        due = record.step == trainer.last_step or (self.interval and record.step % self.interval == 0)
        if not due:
            return
        started = time.perf_counter()
        parts = []
        for held_out in self.held_out:
            for metric, value in evaluate_set(trainer.step_fn, held_out, trainer.ps).items():
                record.extra[f"eval/{held_out.name}/{metric}"] = value
            parts.append(f"{held_out.name} CE {record.extra[f'eval/{held_out.name}/CE']:.4f} "
                         f"PPL {record.extra[f'eval/{held_out.name}/PPL']:.2f}")
        record.extra["eval/lm_seconds"] = time.perf_counter() - started
        trainer.log(f"eval   {record.step:>6} | " + " | ".join(parts))
