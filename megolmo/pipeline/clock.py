"""Spans of pipeline work, timed where the work runs.

On a GPU the host returns from a forward as soon as its kernels are queued, so host clocks around it
measure the launch, not the work. There the spans are CUDA events recorded on the current stream,
read once per step after the step's work (``resolve``); on a CPU the host clock is the work's clock.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch


class SpanClock:
    def __init__(self, device: torch.device):
        self.on_gpu = device.type == "cuda"
        self._open: list[tuple[str, object, object]] = []
        self._origin: object = None

    def _mark(self) -> object:
        if self.on_gpu:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        """The step's origin: every span is reported in seconds since this mark."""
        self._open = []
        self._origin = self._mark()

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        begin = self._mark()
        yield
        self._open.append((name, begin, self._mark()))

    def _seconds(self, mark: object) -> float:
        if self.on_gpu:
            return self._origin.elapsed_time(mark) / 1e3
        return mark - self._origin

    def resolve(self) -> list[tuple[str, float, float]]:
        """All spans of the step as ``(name, start s, end s)`` relative to ``start()`` (waits for the GPU)."""
        if self.on_gpu:
            torch.cuda.synchronize()
        return [(name, self._seconds(b), self._seconds(e)) for name, b, e in self._open]
