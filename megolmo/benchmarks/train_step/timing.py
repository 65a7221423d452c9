"""Measuring on the benchmark's device: how long work takes, how much CUDA memory a peer holds, and
the rate of one large ``torch.mm`` that stands in for the hardware's peak."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch

from megolmo.benchmarks.train_step.peers import Runner

T = TypeVar("T")


def time_on_device(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """Seconds the work of ``fn`` takes on ``device``, and what ``fn`` returned.

    CUDA kernels run asynchronously: a launch returns to the host before the GPU has done the work, so a
    host clock around ``fn`` measures the launches (and whichever sync happens to block), not the work.
    On CUDA the time is therefore the GPU's own, ``elapsed_time`` between two
    ``torch.cuda.Event(enable_timing=True)`` recorded on the current stream before and after ``fn``
    (``fn``'s work must be on that stream or joined to it, as torch's stream semantics require anyway).
    The device is synchronized first, so the start event fires when ``fn`` is called rather than after
    earlier queued work that would hide ``fn``'s own launch overhead. On a CPU the work is done when
    ``fn`` returns and ``time.perf_counter`` measures it."""
    if device.type != "cuda":
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out
    stream = torch.cuda.current_stream(device)
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start_event.record(stream)
    out = fn()
    end_event.record(stream)
    end_event.synchronize()
    return start_event.elapsed_time(end_event) / 1000.0, out  # elapsed_time is in milliseconds


def allocated(device: torch.device) -> int | None:
    """Bytes of CUDA memory held by tensors once queued work is done; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def release(device: torch.device) -> None:
    """Free a finished group's models before the next is built (hooks keep them in reference cycles)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_mm_flops(dtype: torch.dtype, device: torch.device, n: int, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n ``torch.mm`` in ``dtype``: the best of a few runs after a warm-up."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    torch.mm(a, b)
    best = min(time_on_device(lambda: torch.mm(a, b), device)[0] for _ in range(repeats))
    return 2.0 * n ** 3 / best


@dataclass
class PeerRun:
    """One peer's record within a group: its step losses, timings and CUDA memory."""

    runner: Runner
    build_bytes: int | None  # CUDA memory the builder left allocated; None off CUDA
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    resident_bytes: int | None = None
    peak_step_bytes: int | None = None

    def step(self, device: torch.device) -> tuple[float, float, float]:
        """One training step: its seconds on the device (``time_on_device``), process CPU seconds and the loss."""
        before = allocated(device)
        if before is not None:
            torch.cuda.reset_peak_memory_stats(device)
        cpu_start = time.process_time()
        elapsed, loss = time_on_device(self.runner.step, device)
        cpu = time.process_time() - cpu_start
        if before is not None:
            self._track_memory(before, device)
        self.losses.append(loss)
        return elapsed, cpu, loss

    def _track_memory(self, before: int, device: torch.device) -> None:
        """The step's transient peak on top of what was allocated before it; the resident memory once,
        after the first step, because torch AdamW creates its state there."""
        peak = torch.cuda.max_memory_allocated(device) - before
        self.peak_step_bytes = max(self.peak_step_bytes or 0, peak)
        if self.resident_bytes is None:
            self.resident_bytes = self.build_bytes + allocated(device) - before
