"""The loop's extension points: a callback observes or interrupts training at fixed points.

The trainer calls, on every rank and in this order: ``on_start`` before the first step,
``on_step_end`` after each optimizer step, ``before_save``/``after_save`` around each checkpoint,
``on_end`` after the last step, ``on_failure`` when the loop raised. ``summary`` adds keys to
``summary.json``. Hooks run on every rank (they may use collectives); writing to the run directory is
left to global rank 0. A hook that raises is reported as ``CallbackError`` naming the callback.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Trainer = Any  # ``megolmo.trainer.Trainer``; not imported, since the trainer imports the callbacks


@dataclass
class StepRecord:
    """One optimizer step as ``metrics.jsonl`` records it."""

    step: int
    loss: float
    z_loss: float
    grad_norm: float
    lr: float
    tokens: int
    tokens_per_sec: float
    mfu: float | None
    data_wait_s: float  # the step waited this long for its batch (0 when prefetching keeps up)
    masked_instances: int  # instances the repeated n-gram filter took out of the loss
    step_time_s: float  # wall time of the step; it ends by reading its results, so GPU work is included
    peak_allocated_gb: float | None  # CUDA: peak memory this step allocated, and the allocator reserved
    peak_reserved_gb: float | None
    extra: dict[str, float] = field(default_factory=dict)  # named metrics callbacks add (eval/<set>/CE, ...)

    def row(self) -> dict[str, Any]:
        """The step as one flat ``metrics.jsonl`` object, which every logger receives too."""
        fields = {k: v for k, v in self.__dict__.items() if k != "extra"}
        return {**fields, **self.extra}

    def numbers(self) -> dict[str, int | float]:
        """The row's numbers, for loggers; None (e.g. MFU on CPUs) is left out."""
        return {k: v for k, v in self.row().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class CallbackError(RuntimeError):
    """A callback's hook raised: the message names the callback and the hook, in one line."""


class Callback:
    @property
    def name(self) -> str:
        return type(self).__name__

    def on_start(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, record: StepRecord) -> None: ...
    def before_save(self, trainer: Trainer, step: int) -> None: ...
    def after_save(self, trainer: Trainer, step: int, path: Path) -> None: ...
    def on_end(self, trainer: Trainer) -> None: ...
    def on_failure(self, trainer: Trainer, error: BaseException) -> None: ...

    def summary(self, trainer: Trainer) -> dict[str, Any]:
        """Keys for ``summary.json`` at the end of the run (called on every rank)."""
        return {}


class CallbackList:
    """Calls one hook on every callback in order; the first that raises ends the hook as a
    ``CallbackError`` naming it (the original error is its cause)."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)

    def call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            self._guarded(callback, hook, *args)

    def summaries(self, trainer: Trainer) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for callback in self.callbacks:
            merged.update(self._guarded(callback, "summary", trainer))
        return merged

    @staticmethod
    def _guarded(callback: Callback, hook: str, *args: Any) -> Any:
        try:
            return getattr(callback, hook)(*args)
        except CallbackError:
            raise
        except Exception as error:  # noqa: BLE001 - re-raised with the callback's name
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise CallbackError(f"callback {callback.name}.{hook} failed: {type(error).__name__}: "
                                f"{first_line}") from error
