"""The next steps' batches, read and assembled on a background thread while the current step computes.

Reading a step's rows is memmap page-ins plus the vocabulary check and the repetition filter: CPU work the
GPU need not wait for. A bounded queue keeps at most ``depth`` steps ahead (pinned, on CUDA, so the copy to
the device can overlap), and an error raised on the thread is handed to the training loop unchanged, at the
step that needed the batch.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable

from megolmo.data.loader import StepBatch

_POLL_S = 0.1  # how often a blocked producer checks whether the loop has gone


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """``get(step)`` for the steps given, in order; ``depth=0`` reads on the calling thread instead."""

    def __init__(self, read: Callable[[int], StepBatch], steps: Iterable[int], depth: int, pin_memory: bool):
        self._read = read
        self._pin = pin_memory
        self._depth = depth
        self._closed = threading.Event()
        self._queue: queue.Queue[StepBatch | _Failure] = queue.Queue(maxsize=max(depth, 1))
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._produce, args=(list(steps),), name="megolmo-prefetch",
                                            daemon=True)
            self._thread.start()

    def get(self, step: int) -> tuple[StepBatch, float]:
        """The batch of ``step`` and the seconds the caller waited for it."""
        started = time.perf_counter()
        item = self._load(step) if self._thread is None else self._queue.get()
        waited = time.perf_counter() - started
        if isinstance(item, _Failure):
            raise item.error
        if item.step != step:
            raise RuntimeError(f"prefetched step {item.step}, but the loop asked for step {step}")
        return item, waited

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()

    def _load(self, step: int) -> StepBatch:
        batch = self._read(step)
        return batch.pinned() if self._pin else batch

    def _produce(self, steps: list[int]) -> None:
        for step in steps:
            try:
                item: StepBatch | _Failure = self._load(step)
            except BaseException as error:  # noqa: BLE001 - handed to the loop, which raises it
                item = _Failure(error)
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if self._closed.is_set() or isinstance(item, _Failure):
                return
