"""Pictures of runs, to compare them at a glance (ingredients beside their soup): the training loss and each
evaluation metric against tokens, one line per run, read from each run directory's ``metrics.jsonl``:

    python tools/plot.py RUN_DIR [RUN_DIR ...] [--output DIR]

The x axis is linear in tokens (a log axis would squeeze the end of training, where runs differ). Figures are
drawn on ``matplotlib.figure.Figure`` with the Agg canvas, so pyplot's global state is never touched.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from megolmo.errors import MegolmoConfigError

EVAL_PREFIX = "eval/"
DOWNSTREAM_PREFIX = "eval/downstream/"
HEADLINE_METRICS = ("/acc_v1", "/len_norm_v1", "/f1_v1", "/bpb_v1")


@dataclass
class Run:
    """One run directory's metrics: its rows by step, ascending (of a repeated step, the later row)."""

    name: str
    rows: list[dict[str, Any]]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """Tokens and values of the rows that have ``key``."""
        rows = [row for row in self.rows if row.get(key) is not None]
        return [row["tokens"] for row in rows], [row[key] for row in rows]


def read_run(run_dir: Path) -> Run:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise MegolmoConfigError(f"{path}: no metrics file (is {run_dir} a run directory?)")
    by_step: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MegolmoConfigError(f"{path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int) or "tokens" not in row:
                raise MegolmoConfigError(f"{path}:{number}: not a metrics row (an object with step and tokens)")
            by_step[row["step"]] = row  # a resumed run re-appends the steps it recomputed: the later row wins
    return Run(run_dir.resolve().name, [by_step[step] for step in sorted(by_step)])


def format_tokens(tokens: float, _position: int | None = None) -> str:
    """Tick label: 0, 500M, 1B, 1.5B (thousands and millions for short runs)."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(tokens) >= scale:
            return f"{tokens / scale:.3g}{suffix}"
    return f"{tokens:.3g}"


def _figure(title: str, ylabel: str) -> Figure:
    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("tokens")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_formatter(FuncFormatter(format_tokens))
    ax.grid(alpha=0.3)
    return fig


def loss_figure(runs: list[Run]) -> Figure:
    """Training loss against tokens, one line per run that has a loss."""
    fig = _figure("training loss", "loss")
    ax = fig.axes[0]
    for run in runs:
        tokens, loss = run.series("loss")
        if tokens:
            ax.plot(tokens, loss, label=run.name, linewidth=1, marker="o" if len(tokens) == 1 else None)  # a lone row
    ax.legend()
    return fig


def eval_figure(runs: list[Run], key: str) -> Figure:
    """One evaluation metric against tokens, a line with markers per run that has it."""
    fig = _figure(key, key.rsplit("/", 1)[-1])
    ax = fig.axes[0]
    for run in runs:
        tokens, values = run.series(key)
        if tokens:
            ax.plot(tokens, values, marker="o", label=run.name)
    ax.legend()
    return fig


def plotted(key: str) -> bool:
    """Held-out CE and PPL, and of each downstream task its headline metrics (the library's ``_v1`` accuracy,
    length-normalized accuracy, F1 and bits per byte): a full task list would otherwise draw ~10 figures a task."""
    if not key.startswith(EVAL_PREFIX) or key == "eval/seconds":
        return False
    return not key.startswith(DOWNSTREAM_PREFIX) or key.endswith(HEADLINE_METRICS)


def eval_keys(runs: list[Run]) -> list[str]:
    return sorted({key for run in runs for row in run.rows for key in row if plotted(key)})


def eval_filename(key: str) -> str:
    """``eval/c4_en/CE`` -> ``eval_c4_en_CE.png``."""
    return "eval_" + re.sub(r"[^A-Za-z0-9.-]+", "_", key.removeprefix(EVAL_PREFIX)).strip("_") + ".png"


def plot_runs(run_dirs: list[Path], output: Path) -> list[Path]:
    """Writes ``loss.png`` (when any run has a loss) and one ``eval_<key>.png`` per evaluation metric found into
    ``output``; returns the written paths."""
    if not run_dirs:
        raise MegolmoConfigError("plot_runs: no run directories given")
    runs = [read_run(Path(run_dir)) for run_dir in run_dirs]
    figures = {"loss.png": loss_figure(runs)} if any(run.series("loss")[0] for run in runs) else {}
    figures.update({eval_filename(key): eval_figure(runs, key) for key in eval_keys(runs)})
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        fig.savefig(output / name, dpi=100)
        written.append(output / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="PNGs of the training loss and each evaluation metric against "
                                     "tokens, one line per run.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="directories with metrics.jsonl")
    parser.add_argument("--output", type=Path, help="directory for the PNGs (default: the first RUN_DIR)")
    args = parser.parse_args(argv)
    try:
        written = plot_runs(args.run_dirs, args.output or args.run_dirs[0])
    except MegolmoConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
