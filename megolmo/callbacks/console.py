"""The console: what a user watching the job's log sees (global rank 0 prints)."""
from __future__ import annotations

import time
from pathlib import Path

from megolmo.callbacks.base import Callback, StepRecord


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def step_line(record: StepRecord, max_steps: int, eta_s: float) -> str:
    return (f"step {record.step:>6}/{max_steps} | loss {record.loss:.4f} | z {record.z_loss:.2e} | "
            f"gnorm {record.grad_norm:.3f} | lr {record.lr:.2e} | {record.tokens_per_sec:,.0f} tok/s | "
            f"ETA {duration(eta_s)}")


class ConsoleLog(Callback):
    def __init__(self, log_interval: int):
        self.log_interval = log_interval
        self._started = 0.0

    def on_start(self, trainer) -> None:
        trainer.log(f"run directory: {trainer.run_dir.path.resolve()}")
        k = trainer.kernels
        trainer.log(f"kernels: backend {k.backend}, attention {k.attention}, norm {k.norm}, fp8 {k.fp8 or 'off'}, "
                    f"AdamW {k.optimizer}")
        if trainer.resumed_from is not None:
            trainer.log(f"starting at step {trainer.start_step} from {trainer.resumed_from}")
        self._started = time.perf_counter()

    def on_step_end(self, trainer, record: StepRecord) -> None:
        if record.extra.get("nonfinite_step"):
            trainer.log(trainer.nonfinite.skipped_line(record.step))
        if record.extra.get("skipped_step"):
            trainer.log(f"step {record.step}: update skipped by the skip-step guard (loss {record.loss:.4f}, "
                        f"gnorm {record.grad_norm:.3f}); the schedule stays at lr {record.lr:.2e}")
        if record.step % self.log_interval == 0 or record.step == trainer.last_step:
            done = record.step - trainer.start_step
            eta = (time.perf_counter() - self._started) / done * (trainer.last_step - record.step)
            trainer.log(step_line(record, trainer.max_steps, eta))

    def after_save(self, trainer, step: int, path: Path) -> None:
        report = trainer.last_save
        if report.asynchronous:
            trainer.log(f"saving checkpoint {path} in the background (training blocked {report.blocked_s:.2f} s)")
        else:
            trainer.log(f"saved checkpoint {path} (training blocked {report.blocked_s:.2f} s)")

    def on_end(self, trainer) -> None:
        trainer.log(f"done: {len(trainer.records)} steps; run directory {trainer.run_dir.path.resolve()}")
