"""In-loop evaluation: held-out perplexity and downstream tasks every ``eval.interval`` steps and after the
job's last step.

Its metrics join the step's record (``eval/<set>/CE``, ``eval/downstream/<task>/<metric>``), so
``metrics.jsonl`` and every logger see them on the step they describe; it must therefore come before those
callbacks.
"""
from __future__ import annotations

import time

from megolmo.callbacks.base import Callback, StepRecord
from megolmo.evaluation.suite import Evaluations

class Evaluation(Callback):
    def __init__(self, evaluations: Evaluations, interval: int | None):
        self.evaluations = evaluations
        self.interval = interval

    def on_step_end(self, trainer, record: StepRecord) -> None:
        due = record.step == trainer.last_step or (self.interval and record.step % self.interval == 0)
        if not due:
            return
        started = time.perf_counter()
        results = self.evaluations.run(trainer.step_fn, trainer.cfg.trainer.global_batch_size,
                                       trainer.cfg.data.seq_len)
        record.extra.update(results)
        record.extra["eval/seconds"] = time.perf_counter() - started
        parts = [f"{h.name} CE {results[f'eval/{h.name}/CE']:.4f} PPL {results[f'eval/{h.name}/PPL']:.2f}"
                 for h in self.evaluations.held_out]
        parts += [f"{t.name} {t.metric_type} {results[f'eval/downstream/{t.name}/{t.metric_type}_v1']:.4f}"
                  for t in self.evaluations.tasks]
        trainer.log(f"eval   {record.step:>6} | " + " | ".join(parts))
