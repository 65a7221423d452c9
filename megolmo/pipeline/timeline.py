"""The pipeline timeline: a Chrome trace (one row per rank) and a PNG picture of a profiled step,
and the bubble fraction measured from the recorded spans.

Spans are seconds since each rank's step start (device-timed on GPUs, ``pipeline/clock.py``). The
bubble follows Megatron's definition: idle over compute time on a rank, ``(step span - compute) /
compute``, whose ideal is ``(P - 1) / M`` for 1F1B and ``(P - 1) / (V M)`` interleaved; zero-bubble
schedules fill part of it with weight-gradient passes (W).
"""
from __future__ import annotations

import json
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the stage module imports torch.distributed.pipelining (and with it torch._dynamo)
    from megolmo.pipeline.stage import ScheduleRecord

COLORS = {"F": "#4C72B0", "B": "#DD8452", "I": "#C44E52", "W": "#55A868"}
LEGEND = "F forward, B backward, I input-gradient backward, W weight-gradient backward"


def span_kind(name: str) -> str:
    return name[0]


def busy_and_span(record: ScheduleRecord) -> tuple[float, float]:
    """Seconds of computation, and from the step's start to its last computation's end."""
    busy = sum(t1 - t0 for _, t0, t1 in record.spans)
    return busy, max((t1 for _, _, t1 in record.spans), default=0.0)


def chrome_trace(records: list[ScheduleRecord]) -> dict:
    events = []
    for rank, record in enumerate(records):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}})
        for name, t0, t1 in record.spans:
            events.append({"name": name, "cat": span_kind(name), "ph": "X", "pid": 0, "tid": rank,
                           "ts": t0 * 1e6, "dur": (t1 - t0) * 1e6})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_timeline(records: list[ScheduleRecord], directory: Path, step: int) -> tuple[Path, Path]:
    """Write ``pipeline_step{step}.json`` (chrome://tracing, Perfetto) and ``pipeline_step{step}.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    trace_path = directory / f"pipeline_step{step}.json"
    trace_path.write_text(json.dumps(chrome_trace(records)))
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(records) + 1.2))
    for rank, record in enumerate(records):
        for name, t0, t1 in record.spans:
            ax.broken_barh([(t0 * 1e3, (t1 - t0) * 1e3)], (rank - 0.4, 0.8), facecolors=COLORS[span_kind(name)])
            if t1 > t0:
                ax.text((t0 + t1) / 2 * 1e3, rank, name.split(".")[0], ha="center", va="center", fontsize=6,
                        color="white")
    ax.set_yticks(range(len(records)), [f"rank {r}" for r in range(len(records))])
    ax.invert_yaxis()
    ax.set_xlabel("ms since step start")
    ax.set_title(f"pipeline timeline, step {step} ({LEGEND})")
    fig.tight_layout()
    png_path = directory / f"pipeline_step{step}.png"
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return trace_path, png_path
