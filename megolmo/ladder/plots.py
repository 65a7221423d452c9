"""The fit's pictures in the paper's style: step 1 (task loss against tokens, a curve per size through the
ladder's final points), step 2 (accuracy against task loss, the sigmoid through the intermediate points) and,
with a held-out run, predicted against actual accuracy. Drawn on Agg figures, never through pyplot."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from megolmo.ladder.fit import LadderFit, step1_loss, step1_points, step2_accuracy, step2_points
from megolmo.ladder.inputs import LadderRun
from megolmo.plots import format_tokens


def _grid(count: int, width: float = 4.0) -> tuple[Figure, list]:
    cols = min(count, 4)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(width * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(count)]
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, axes


def _colors(runs: list[LadderRun]) -> dict[int, tuple]:
    sizes = sorted({run.n for run in runs})
    return {n: colormaps["viridis"](i / max(1, len(sizes) - 1)) for i, n in enumerate(sizes)}


def _size_label(n: float) -> str:
    return f"N={n / 1e9:.2g}B" if n >= 1e9 else f"N={n / 1e6:.3g}M"


def step1_figure(fit: LadderFit, runs: list[LadderRun], holdout: LadderRun | None) -> Figure:
    tasks = list(fit.tasks)
    fig, axes = _grid(len(tasks))
    colors = _colors(runs)
    d_max = max([run.final_tokens for run in runs] + ([holdout.final_tokens] if holdout else []))
    d_grid = np.geomspace(min(run.final_tokens for run in runs) / 1.5, d_max * 1.5, 200)
    for ax, task in zip(axes, tasks):
        params = fit.tasks[task].step1
        n, d, loss = step1_points(runs, task)
        for size, color in colors.items():
            ax.plot(d_grid, step1_loss(params, size, d_grid), color=color, linewidth=1, label=_size_label(size))
            ax.scatter(d[n == size], loss[n == size], color=color, s=16, zorder=3)
        if holdout:
            _, d_h, loss_h = step1_points([holdout], task)
            ax.plot(d_grid, step1_loss(params, holdout.n, d_grid), color="red", linestyle="--", linewidth=1,
                    label=f"{holdout.name} ({_size_label(holdout.n)})")
            ax.scatter(d_h, loss_h, color="red", marker="*", s=90, zorder=4)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(format_tokens))
        ax.set_title(f"{task}: step 1")
        ax.set_xlabel("tokens D")
        ax.set_ylabel("task loss")
    axes[0].legend(fontsize=7)
    return fig


def step2_figure(fit: LadderFit, runs: list[LadderRun], holdout: LadderRun | None) -> Figure | None:
    tasks = [task for task, task_fit in fit.tasks.items() if task_fit.step2 is not None]
    if not tasks:
        return None
    fig, axes = _grid(len(tasks))
    colors = _colors(runs)
    for ax, task in zip(axes, tasks):
        task_fit = fit.tasks[task]
        for run in runs:
            loss, accuracy = step2_points(run, task)
            ax.scatter(loss, accuracy, color=colors[run.n], s=6, alpha=0.5)
        if holdout:
            loss, accuracy = step2_points(holdout, task)
            ax.scatter(loss, accuracy, color="red", marker="*", s=30, label=holdout.name)
        top = max(max(step2_points(run, task)[0], default=1.0) for run in runs) * 1.1
        grid = np.linspace(0, top, 200)
        ax.plot(grid, step2_accuracy(task_fit.step2, grid), color="black", linewidth=1.2, label="fit")
        ax.axhline(task_fit.chance, color="gray", linestyle=":", linewidth=1, label="chance")
        ax.scatter([0], [1], color="black", marker="x", s=30)
        ax.set_title(f"{task}: step 2")
        ax.set_xlabel("task loss")
        ax.set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    return fig


def holdout_figure(comparison: dict[str, dict]) -> Figure:
    """Predicted (with the bootstrap's 95% interval) against actual, task loss and accuracy."""
    fig, axes = _grid(2, width=5.0)
    for ax, metric in zip(axes, ("task_loss", "accuracy")):
        rows = [(task, c["predicted"], c["actual"][metric]) for task, c in comparison.items()
                if c["actual"][metric] is not None]
        for task, predicted, actual in rows:
            low, high = predicted[f"{metric}_ci95"]
            # with few draws the interval may miss the point estimate
            spread = [[max(0.0, predicted[metric] - low)], [max(0.0, high - predicted[metric])]]
            ax.errorbar(actual, predicted[metric], yerr=spread,
                        fmt="o", capsize=3)
            ax.annotate(task, (actual, predicted[metric]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        values = [v for _, p, a in rows for v in (p[metric], a)]
        if values:
            ax.plot([min(values), max(values)], [min(values), max(values)], color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"{metric.replace('_', ' ')}: predicted vs actual")
        ax.set_xlabel("actual")
        ax.set_ylabel("predicted")
    return fig


def write_plots(fit: LadderFit, runs: list[LadderRun], out_dir: Path, holdout: LadderRun | None = None,
                comparison: dict[str, dict] | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"step1.png": step1_figure(fit, runs, holdout), "step2.png": step2_figure(fit, runs, holdout),
               "predicted_vs_actual.png": holdout_figure(comparison) if comparison else None}
    written = []
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(out_dir / name, dpi=110)
            written.append(out_dir / name)
    return written
