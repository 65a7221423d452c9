"""``metrics.jsonl``: one JSON object per optimizer step (DESIGN.md's run directory)."""
from __future__ import annotations

from megolmo.callbacks.base import Callback, StepRecord


class MetricsFile(Callback):
    def on_step_end(self, trainer, record: StepRecord) -> None:
        trainer.run_dir.append_metrics(record.row())
