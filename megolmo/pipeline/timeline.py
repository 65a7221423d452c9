"""The pipeline timeline: a Chrome trace (one row per rank) and a PNG picture of a profiled step,
and the bubble fraction measured from the recorded spans.

Bubble fraction follows Megatron's definition: idle time over compute time on a rank,
``(step span - forward/backward time) / forward/backward time``, whose ideal value is ``(P - 1) / M``
for 1F1B and ``(P - 1) / (V M)`` interleaved.
"""
from __future__ import annotations

import json
from pathlib import Path

from megolmo.pipeline.engine import ScheduleRecord

COLORS = {"F": "#4C72B0", "B": "#DD8452", "send": "#55A868", "recv": "#C44E52"}


def span_kind(name: str) -> str:
    return next(kind for kind in ("send", "recv", "F", "B") if name.startswith(kind))


def busy_and_span(record: ScheduleRecord) -> tuple[float, float]:
    """Seconds spent in forward/backward, and from the step's start to its last recorded event."""
    busy = sum(t1 - t0 for name, t0, t1 in record.spans if span_kind(name) in ("F", "B"))
    end = max((t1 for _, _, t1 in record.spans), default=record.started)
    return busy, end - record.started


def theoretical_bubble(pipeline: int, micro_batches: int, virtual: int) -> float:
    return (pipeline - 1) / (virtual * micro_batches)


def chrome_trace(records: list[ScheduleRecord]) -> dict:
    origin = min(r.started for r in records)
    events = []
    for rank, record in enumerate(records):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}})
        for name, t0, t1 in record.spans:
            events.append({"name": name, "cat": span_kind(name), "ph": "X", "pid": 0, "tid": rank,
                           "ts": (t0 - origin) * 1e6, "dur": (t1 - t0) * 1e6})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_timeline(records: list[ScheduleRecord], directory: Path, step: int) -> tuple[Path, Path]:
    """Write ``pipeline_step{step}.json`` (chrome://tracing, Perfetto) and ``pipeline_step{step}.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    trace_path = directory / f"pipeline_step{step}.json"
    trace_path.write_text(json.dumps(chrome_trace(records)))
    origin = min(r.started for r in records)
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(records) + 1.2))
    for rank, record in enumerate(records):
        for name, t0, t1 in record.spans:
            kind = span_kind(name)
            height = 0.8 if kind in ("F", "B") else 0.3
            ax.broken_barh([((t0 - origin) * 1e3, (t1 - t0) * 1e3)], (rank - height / 2, height),
                           facecolors=COLORS[kind])
            if kind in ("F", "B") and (t1 - t0) * 1e3 > 0:
                ax.text((t0 + t1 - 2 * origin) / 2 * 1e3, rank, name.split(".")[0], ha="center", va="center",
                        fontsize=6, color="white")
    ax.set_yticks(range(len(records)), [f"rank {r}" for r in range(len(records))])
    ax.invert_yaxis()
    ax.set_xlabel("ms since step start")
    ax.set_title(f"pipeline timeline, step {step} (F forward, B backward, green send, red recv wait)")
    fig.tight_layout()
    png_path = directory / f"pipeline_step{step}.png"
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return trace_path, png_path
